//! `/chat/completions` and `/embeddings`: authenticate, resolve the model, forward (or mock),
//! and append the spend record before the response finishes.
//!
//! The client's body is parsed once and checked ([`parse`]: model, end user, `stream`,
//! `messages`), the `model` substituted (and `stream_options.include_usage` forced on for
//! streams), and serialised once for the upstream. The upstream's answer is returned byte for
//! byte; only `usage` and `model` are read out of it.

use std::pin::Pin;
use std::sync::Arc;
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
use super::anthropic_chat;
use super::auth::Caller;
use super::error::ProxyError;
use super::limits;
use super::mock;
use super::observe;
use super::pricing::Price;
use super::provider::{self, CallKind};
use super::request::read_json_body;
use super::router::{self, Failure, Group};
use super::stream::{self, StreamOutcome, Wire};
use super::tokens;
use super::upstream::{Endpoint, UpstreamClient, Usage};
use crate::metrics::proxy::UpstreamErrorKind;
use crate::spend::{SCHEMA_VERSION, SpendRecord, Status};

mod parse;

/// LiteLLM's response headers (parsed once, not per response).
const CALL_ID: HeaderName = HeaderName::from_static("x-litellm-call-id");
const RESPONSE_COST: HeaderName = HeaderName::from_static("x-litellm-response-cost");

/// Chunks buffered between the upstream reader and a slow client.
const STREAM_BUFFER: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallType {
    Chat,
    Embedding,
    /// Anthropic's `/v1/messages`.
    Messages,
    /// Anthropic's `/v1/messages/count_tokens`: relayed, never billed.
    CountTokens,
    /// OpenAI's `/v1/responses`.
    Responses,
}

impl CallType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat_completion",
            Self::Embedding => "embedding",
            Self::Messages | Self::CountTokens => "anthropic_messages",
            Self::Responses => "responses",
        }
    }

    fn kind(self) -> CallKind {
        match self {
            Self::Chat => CallKind::Chat,
            Self::Embedding => CallKind::Embeddings,
            Self::Messages => CallKind::Messages,
            Self::CountTokens => CallKind::CountTokens,
            Self::Responses => CallKind::Responses,
        }
    }

    /// The route's path, for error messages.
    fn route(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Embedding => "/embeddings",
            Self::Messages => "/v1/messages",
            Self::CountTokens => "/v1/messages/count_tokens",
            Self::Responses => "/v1/responses",
        }
    }

    /// Errors on Anthropic's routes come in Anthropic's shape (its SDKs and Claude Code read it).
    fn anthropic(self) -> bool {
        matches!(self, Self::Messages | Self::CountTokens)
    }

    fn streams(self) -> bool {
        !matches!(self, Self::Embedding | Self::CountTokens)
    }
}

/// Anthropic's version and beta headers, passed on to an `anthropic/` upstream.
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

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

/// Anthropic's Messages API, for `anthropic/` deployments.
pub async fn messages(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    detached(state, headers, body, CallType::Messages).await
}

/// Anthropic's token counting, relayed to `anthropic/` deployments and not billed.
pub async fn count_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    detached(state, headers, body, CallType::CountTokens).await
}

/// OpenAI's Responses API, for `openai/` and `azure/` deployments.
pub async fn responses(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    detached(state, headers, body, CallType::Responses).await
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
            Err(e) if call_type.anthropic() => e.into_anthropic_response(),
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
    /// The model the client asked for (recorded as `model`).
    model: String,
    /// The deployment that answers (after retries and fallbacks, the one that did).
    route: std::sync::Arc<Route>,
    /// A wildcard deployment's upstream model for this call, its price and endpoint (boxed: the
    /// call's future is moved to the heap whole, and every byte of it costs on each request).
    wildcard: Option<Box<Wildcard>>,
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
        status: Status,
        upstream_model: Option<String>,
    ) -> SpendRecord {
        let billable = status == Status::Success;
        let key = self.caller.key();
        SpendRecord {
            schema: SCHEMA_VERSION,
            transaction_id: self.id_text(),
            start_time: Some(self.start_time),
            end_time: Utc::now(),
            call_type: self.call_type.as_str().to_owned(),
            model: self.model.clone(),
            upstream_model: Some(
                limits::bounded_upstream_model(upstream_model)
                    .unwrap_or_else(|| self.upstream_model().to_owned()),
            ),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            total_tokens: Some(
                usage
                    .total_tokens
                    .unwrap_or(usage.prompt_tokens + usage.completion_tokens),
            ),
            cache_read_input_tokens: usage.cache_read_tokens,
            cache_creation_input_tokens: usage.cache_creation_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            usage_estimated: estimated,
            response_cost: if billable {
                self.price().map(|p| p.cost(&usage))
            } else {
                None
            },
            end_user_id: self.end_user_id.clone(),
            user_id: key.and_then(|k| k.user_id.clone()),
            team_id: key.and_then(|k| k.team_id.clone()),
            key_alias: key.and_then(|k| k.key_alias.clone()),
            key_hash: key.map(|k| k.token()),
            stream: self.stream,
            status,
            duration_ms: Some(self.started.elapsed().as_millis() as u64),
        }
    }

    /// Appends the record; a failure to write refuses the request (it could not be billed).
    async fn write(&self, record: &SpendRecord) -> Result<(), ProxyError> {
        let written = self.state.spend().append(record).await;
        let metrics = self.state.metrics();
        metrics.record_spend_record(written.is_ok());
        if written.is_ok() && record.is_billable() {
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

    /// A chat call answered by an `anthropic/` deployment: translated to the Messages API and back.
    fn translated(&self) -> bool {
        self.call_type == CallType::Chat && self.route.anthropic
    }

    /// The model sent upstream.
    fn upstream_model(&self) -> &str {
        match &self.wildcard {
            Some(w) => &w.upstream_model,
            None => &self.route.deployment.upstream_model,
        }
    }

    fn price(&self) -> Option<&Price> {
        match &self.wildcard {
            Some(w) => w.price.as_ref(),
            None => self.route.price.as_ref(),
        }
    }

    /// Counts a failed attempt in the metrics.
    /// A call whose upstream answered with an error inside its answer (a stream's error event,
    /// a failed response) is recorded as a failure: counted, logged, not billed.
    fn outcome(&self, upstream_error: Option<&str>) -> Status {
        let Some(reason) = upstream_error else {
            return Status::Success;
        };
        self.state
            .metrics()
            .record_upstream_error(&self.model, UpstreamErrorKind::InvalidResponse);
        tracing::warn!(transaction_id = %self.transaction_id, reason, "the upstream answered with an error; not billed");
        Status::Failure
    }

    fn count_failure(&self, error: &ProxyError) {
        if let Some(kind) = observe::upstream_error_kind(error) {
            self.state
                .metrics()
                .record_upstream_error(&self.model, kind);
        }
    }

    /// Logs an upstream failure (never billed) and passes the error on.
    async fn fail(&self, error: ProxyError) -> ProxyError {
        self.count_failure(&error);
        self.fail_counted(error).await
    }

    /// [`Call::fail`] for a failure already counted.
    async fn fail_counted(&self, error: ProxyError) -> ProxyError {
        if self.call_type == CallType::CountTokens {
            return error;
        }
        let record = self.record(Usage::default(), false, Status::Failure, None);
        if let Err(e) = self.state.spend().append(&record).await {
            tracing::warn!(error = %e, "failure record not written");
        }
        error
    }

    fn endpoint(&self) -> &Endpoint {
        if let Some(e) = self.wildcard.as_ref().and_then(|w| w.endpoint.as_ref()) {
            return e;
        }
        self.route.endpoint(self.call_type.kind())
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

/// One call: the caller authenticated and the request read ([`parse::request`]), then forwarded
/// (with retries and fallbacks, or mocked) and its spend record written.
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
    let request = parse::request(&state, &caller, call_type, &headers, body)?;
    // Not needed past here: not kept in the call's future across the upstream's answer.
    drop(headers);

    let group = request.group;
    let first = group.pick(0, rand::random::<f64>);
    let route = group.routes[first].clone();
    answers(&route, call_type, &request.model)?;
    let matched = request.matched;
    let wildcard = wildcard_of(
        &state,
        &route,
        matched.as_deref(),
        &request.model,
        call_type,
    );
    let stream = request.stream;
    let mut call = Call {
        state,
        model: request.model,
        route,
        wildcard,
        call_type,
        transaction_id: transaction_id(&start_time),
        start_time,
        started,
        caller,
        end_user_id: request.end_user_id,
        stream,
    };
    let body = request.body;
    let stream_options = body.get("stream_options");
    let client_wants_usage =
        call_type == CallType::Chat && stream && wants_usage(stream_options.as_ref());
    if call.route.deployment.mock_response.is_some() {
        return mock_answer(call, &body.to_map(), client_wants_usage).await;
    }

    // Only `model` (and, for streams, `stream_options`) change; the rest goes as the client sent it.
    let options = if stream && call_type == CallType::Chat {
        Some(
            serde_json::to_vec(&include_usage(stream_options))
                .map_err(|e| ProxyError::Internal(format!("encoding stream_options: {e}")))?,
        )
    } else {
        None
    };
    let payload = Payload {
        body: &body,
        stream_options: options.as_deref(),
        headers: &request.extra_headers,
    };
    let response = match send(&mut call, group, first, matched, &payload).await {
        Ok(Answer::Upstream(r)) => r,
        Ok(Answer::Mock) => return mock_answer(call, &body.to_map(), client_wants_usage).await,
        Err(e) if call.translated() => {
            return Err(call.fail_counted(openai_error(e)).await);
        }
        Err(e) => return Err(call.fail_counted(e).await),
    };
    // Estimated only if the upstream reports no usage.
    let prompt = PromptEstimate {
        body: body.bytes().clone(),
        call_type,
    };
    drop(body);
    let model_name = call.model.clone();

    if stream && call.translated() {
        use futures::StreamExt;
        let mut translator = anthropic_chat::StreamTranslator::new(call.start_time.timestamp());
        let source = response
            .into_stream()
            .map(move |chunk| chunk.map(|bytes| translator.push(&bytes)));
        let wire = Wire::Chat { client_wants_usage };
        return Ok(start_stream(call, source, wire, move || prompt.tokens()));
    }
    if stream {
        let source = response.into_stream();
        let wire = match call_type {
            CallType::Messages => Wire::Anthropic,
            CallType::Responses => Wire::Responses,
            _ => Wire::Chat { client_wants_usage },
        };
        return Ok(start_stream(call, source, wire, move || prompt.tokens()));
    }

    let (content_type, bytes) =
        match UpstreamClient::read_body(response, call.endpoint(), &model_name).await {
            Ok(r) => r,
            Err(e) => return Err(call.fail(e).await),
        };
    let bytes = if call.translated() {
        Bytes::from(anthropic_chat::response(
            &bytes,
            call.start_time.timestamp(),
        )?)
    } else {
        bytes
    };
    let content_type = if call.translated() {
        None
    } else {
        content_type
    };
    if call_type == CallType::CountTokens {
        let mut response = (StatusCode::OK, bytes).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
        );
        return Ok(response);
    }
    let read = read_answer(&bytes, call_type, || prompt.tokens());
    let status = call.outcome(read.failed.as_deref());
    let record = call.record(read.usage, read.estimated, status, read.upstream_model);
    call.write(&record).await?;
    let mut response = (StatusCode::OK, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    call.headers(&mut response, record.response_cost);
    Ok(response)
}

/// Refuses a call type the deployment's provider does not answer (`/v1/messages` to an OpenAI
/// model, `/chat/completions` to an Anthropic one), naming the model and what would work.
fn answers(route: &Route, call_type: CallType, model: &str) -> Result<(), ProxyError> {
    let d = &route.deployment;
    let mock =
        d.mock_response.is_some() && !matches!(call_type, CallType::Chat | CallType::Embedding);
    if route.answers(call_type.kind()) && !mock {
        return Ok(());
    }
    let provider = provider::of(d);
    let served_by = if mock {
        "a mock_response deployment".to_owned()
    } else {
        format!("an {}/ deployment", provider.name())
    };
    let hint = match call_type {
        CallType::Messages | CallType::CountTokens => {
            "the Messages API reaches anthropic/ deployments only; use /chat/completions for this model"
        }
        CallType::Responses => {
            "the Responses API reaches openai/ and azure/ deployments only; use /chat/completions for this model"
        }
        CallType::Chat | CallType::Embedding => {
            "anthropic/ deployments answer /chat/completions and /v1/messages only"
        }
    };
    Err(ProxyError::BadRequest {
        message: format!(
            "model {model:?} is served by {served_by}, which does not answer {}: {hint}",
            call_type.route()
        ),
        param: Some("model".into()),
        code: "unsupported_route_for_model",
    })
}

/// An `anthropic/` upstream's error, for a chat client, in OpenAI's shape.
fn openai_error(e: ProxyError) -> ProxyError {
    match e {
        ProxyError::Upstream {
            status,
            content_type,
            body,
        } => ProxyError::Upstream {
            status,
            content_type,
            body: anthropic_chat::error_body(&body),
        },
        other => other,
    }
}

/// A wildcard deployment's upstream model for a request, with its price (looked up per call:
/// the model is only known now). `None` for every other deployment.
fn wildcard_of(
    state: &AppState,
    route: &Route,
    matched: Option<&str>,
    requested: &str,
    call_type: CallType,
) -> Option<Box<Wildcard>> {
    if !route.wildcard {
        return None;
    }
    let upstream = router::upstream_model(&route.deployment.upstream_model, matched).into_owned();
    let deployment = super::Deployment {
        model_name: requested.to_owned(),
        upstream_model: upstream.clone(),
        // A wildcard Azure deployment is named by the client, as LiteLLM prices it.
        base_model: (route.deployment.base_model.clone()).or_else(|| Some(upstream.clone())),
        ..route.deployment.clone()
    };
    let price = super::price_of(&deployment, state.prices());
    // Azure names the deployment in the URL's path: the endpoint differs per model.
    let kind = call_type.kind();
    let endpoint = route.endpoint(kind);
    let url = provider::of(&deployment).url(&deployment, kind);
    Some(Box::new(Wildcard {
        upstream_model: upstream,
        price,
        endpoint: (url != endpoint.url).then(|| endpoint.with_url(url)),
    }))
}

/// What a wildcard deployment resolves to for one call.
struct Wildcard {
    upstream_model: String,
    price: Option<Price>,
    /// When the provider's URL names the model (Azure).
    endpoint: Option<Endpoint>,
}

/// The client's body, to be sent with each attempt's own `model`.
#[derive(Clone, Copy)]
struct Payload<'a> {
    body: &'a super::json_body::JsonBody,
    /// For chat streams, `stream_options` with `include_usage` on.
    stream_options: Option<&'a [u8]>,
    /// Client headers passed on (Anthropic's version and betas).
    headers: &'a [(HeaderName, HeaderValue)],
}

impl Payload<'_> {
    fn for_model(&self, model: &str) -> Result<Vec<u8>, ProxyError> {
        let model = serde_json::to_vec(model)
            .map_err(|e| ProxyError::Internal(format!("encoding the upstream model: {e}")))?;
        Ok(match self.stream_options {
            Some(options) => self
                .body
                .with_members(&[("model", &model), ("stream_options", options)]),
            None => self.body.with_members(&[("model", &model)]),
        })
    }
}

/// Who answered a call.
enum Answer {
    Upstream(super::upstream::UpstreamResponse),
    /// A mock deployment was chosen (by a retry or a fallback): answered locally.
    Mock,
}

/// Sends the call to deployment `first` of `group`; on a retryable failure to another deployment
/// of the group (up to `num_retries` more attempts), and once the group is exhausted to its
/// `fallbacks` (or, when the prompt is too long or its content refused, its
/// `context_window_fallbacks` / `content_policy_fallbacks`), each with retries of its own. Every attempt ends before any byte reaches the client, so nothing is sent
/// twice to the client; on success `call` names the deployment that answered. Failed attempts
/// are counted in the metrics; the last failure is returned.
async fn send(
    call: &mut Call,
    mut group: Arc<Group>,
    first: usize,
    mut matched: Option<String>,
    payload: &Payload<'_>,
) -> Result<Answer, ProxyError> {
    let state = call.state.clone();
    let settings = state.router();
    let mut next = Some(first);
    // Fallback groups still to try, last first; filled once, when the first group is exhausted.
    let mut pending: Option<Vec<(Arc<Group>, Option<String>)>> = None;
    loop {
        let mut tried = 0u64;
        let mut attempts_left = settings.num_retries;
        // Kept only once the group is given up on: an error held across the next attempt's await
        // would enlarge every call's future (see `Call::wildcard`).
        let (error, failure) = loop {
            let i = match next.take() {
                Some(i) => i,
                None => group.pick(tried, rand::random::<f64>),
            };
            if i < 64 {
                tried |= 1 << i;
            }
            let route = group.routes[i].clone();
            call.wildcard = wildcard_of(
                &state,
                &route,
                matched.as_deref(),
                &call.model,
                call.call_type,
            );
            call.route = route;
            // A retry or fallback may land on a deployment that does not answer this route.
            answers(&call.route, call.call_type, &call.model)?;
            if call.route.deployment.mock_response.is_some() {
                return Ok(Answer::Mock);
            }
            let translated = call.translated();
            let body = if translated {
                anthropic_chat::request(&payload.body.to_map(), call.upstream_model())?
            } else {
                payload.for_model(call.upstream_model())?
            };
            let default_version = [(
                ANTHROPIC_VERSION,
                HeaderValue::from_static(provider::anthropic::DEFAULT_VERSION),
            )];
            let headers = if translated {
                &default_version[..]
            } else {
                payload.headers
            };
            let error = match state
                .upstream()
                .post_json(call.endpoint(), &call.model, body, headers)
                .await
            {
                Ok(response) => return Ok(Answer::Upstream(response)),
                Err(e) => e,
            };
            call.count_failure(&error);
            let failure = router::classify(&error);
            group.failed(i, settings, failure);
            if attempts_left == 0 || !matches!(failure, Failure::Retryable { .. }) {
                break (error, failure);
            }
            attempts_left -= 1;
            tracing::debug!(model = %call.model, deployment = i, error = %error, "attempt failed; retrying");
        };
        let queue = pending.get_or_insert_with(|| {
            let names = match failure {
                Failure::Retryable { .. } | Failure::Other => settings.fallbacks_of(&group.name),
                Failure::ContextWindow => settings.context_window_fallbacks_of(&group.name),
                Failure::ContentPolicy => settings.content_policy_fallbacks_of(&group.name),
                Failure::Client => &[],
            };
            names
                .iter()
                .rev()
                .filter(|n| **n != group.name)
                .filter_map(|n| {
                    let t = state.resolve(n)?;
                    Some((t.group.clone(), t.matched.map(str::to_owned)))
                })
                .collect()
        });
        let Some((fallback, fallback_matched)) = queue.pop() else {
            return Err(error);
        };
        tracing::info!(model = %call.model, from = %group.name, to = %fallback.name, error = %error, "falling back");
        group = fallback;
        matched = fallback_matched;
    }
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
            CallType::Chat | CallType::Messages | CallType::CountTokens => {
                tokens::estimate_messages(&body)
            }
            CallType::Embedding | CallType::Responses => tokens::estimate_embedding_input(&body),
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
    /// A Responses answer's: `failed`, with its `error`, is a failed call.
    #[serde(default)]
    status: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

impl ResponseUsage {
    /// What a failed Responses answer's `error` says.
    fn failure(&self) -> Option<String> {
        (self.status.as_ref().and_then(Value::as_str) == Some("failed")).then(|| {
            let field = |name: &str| self.error.as_ref()?.get(name)?.as_str();
            format!(
                "the upstream answered a failed response: {}: {}",
                field("code").unwrap_or("error"),
                field("message").unwrap_or("(no message)")
            )
        })
    }
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

/// What a whole answer says about its call.
struct AnswerRead {
    usage: Usage,
    /// No usage reported: `usage` is an estimate.
    estimated: bool,
    upstream_model: Option<String>,
    /// Why the call failed, when the answer says it did (a failed Responses answer).
    failed: Option<String>,
}

/// Usage from a whole answer, or an estimate (flagged) when the upstream reported none, and
/// whether it says the call failed.
fn read_answer(
    bytes: &[u8],
    call_type: CallType,
    prompt_estimate: impl FnOnce() -> u64,
) -> AnswerRead {
    // As text: serde_json then skips checking each string's UTF-8 (JSON that is not UTF-8 does
    // not parse either way).
    let text = std::str::from_utf8(bytes).ok();
    let head: Option<ResponseUsage> = text.and_then(|t| serde_json::from_str(t).ok());
    let failed = head.as_ref().and_then(ResponseUsage::failure);
    if let Some(ResponseUsage {
        model,
        usage: Some(usage),
        ..
    }) = head
    {
        return AnswerRead {
            usage,
            estimated: false,
            upstream_model: model,
            failed,
        };
    }
    let meta: Option<ResponseMeta> = text.and_then(|t| serde_json::from_str(t).ok());
    let upstream_model = meta.as_ref().and_then(|m| m.model.clone());
    let (usage, estimated) = match meta {
        Some(ResponseMeta {
            usage: Some(usage), ..
        }) => (usage, false),
        other => {
            let completion = match call_type {
                CallType::Embedding
                | CallType::Messages
                | CallType::CountTokens
                | CallType::Responses => 0,
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
            (Usage::new(prompt_estimate(), completion), true)
        }
    };
    AnswerRead {
        usage,
        estimated,
        upstream_model,
        failed,
    }
}

/// Starts relaying a stream on a tracked task and returns the streaming response.
fn start_stream<S, E>(
    call: Call,
    source: S,
    wire: Wire,
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
        stream::relay(
            Box::pin(source),
            tx,
            wire,
            async |outcome: StreamOutcome| {
                let (usage, estimated) = match outcome.usage {
                    Some(u) => (u, false),
                    None => (
                        Usage::new(prompt_estimate(), outcome.estimated_completion_tokens),
                        true,
                    ),
                };
                let status = call.outcome(outcome.upstream_error.as_deref());
                let record = call.record(usage, estimated, status, outcome.upstream_model);
                call.write(&record).await.is_ok()
            },
        )
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
                let wire = Wire::Chat { client_wants_usage };
                return Ok(start_stream(call, source, wire, move || {
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
        // Refused by `answers` before a mock is chosen.
        CallType::Messages | CallType::CountTokens | CallType::Responses => {
            return Err(ProxyError::Internal(
                "a mock deployment was chosen for a call it does not answer".into(),
            ));
        }
    };
    let record = call.record(usage, false, Status::Success, None);
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
