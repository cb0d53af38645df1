//! Lago's events API as the emulator serves it: `POST /api/v1/events`,
//! `POST /api/v1/events/batch`, `GET /api/v1/events/{transaction_id}`, each behind a gate that
//! counts requests and serves injected faults. Bodies match the real server byte for byte where
//! docs/lago-emulator.md says what they are.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::SecondsFormat;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::Emulator;
use super::counters::bump;
use super::faults::Action;
use super::store::Commit;
use super::validate::{FieldErrors, ParsedEvent, object_fields, parse_event, parse_raw_event};

/// Marks a response the connection layer must not send: it closes the connection instead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropConnection;

/// What Lago Cloud advertises as its per-organization limit on `POST /events`.
const RATE_LIMIT: &str = "500";

pub(crate) fn routes(app: Arc<Emulator>) -> Router {
    Router::new()
        .route("/api/v1/events", post(create_one))
        .route("/api/v1/events/batch", post(create_batch))
        .route("/api/v1/events/{transaction_id}", get(find_one))
        .route(
            "/api/v1/subscriptions/{external_id}",
            get(find_subscription),
        )
        .route("/api/v1/webhooks/public_key", get(webhook_public_key))
        .route_layer(middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app)
}

/// Counts the request, serves a queued fault if there is one, counts the answer.
async fn gate(State(app): State<Arc<Emulator>>, req: Request, next: Next) -> Response {
    let counters = &app.counters;
    bump(&counters.requests, 1);
    let limit = app.body_limit.load(std::sync::atomic::Ordering::Relaxed);
    let req = if limit == 0 {
        req
    } else {
        let (parts, body) = req.into_parts();
        // Read one byte past the limit at most, like a proxy that stops at its cap.
        match axum::body::to_bytes(body, limit + 1).await {
            Ok(bytes) if bytes.len() <= limit => {
                Request::from_parts(parts, axum::body::Body::from(bytes))
            }
            _ => {
                bump(&counters.faults_served, 1);
                let response = too_large();
                counters.status(response.status().as_u16());
                return response;
            }
        }
    };
    let response = match app.faults.next() {
        None => next.run(req).await,
        Some(action) => {
            bump(&counters.faults_served, 1);
            match action {
                Action::ServerError(status) => server_error(status),
                Action::RateLimit {
                    reset_secs,
                    retry_after,
                } => rate_limited(reset_secs, retry_after),
                Action::Delay(duration) => {
                    tokio::time::sleep(duration).await;
                    next.run(req).await
                }
                Action::Reset => dropped(),
                Action::DropResponse => {
                    let _answer_never_sent = next.run(req).await;
                    dropped()
                }
            }
        }
    };
    if response.extensions().get::<DropConnection>().is_some() {
        bump(&counters.connections_dropped, 1);
    } else {
        counters.status(response.status().as_u16());
    }
    response
}

async fn create_one(State(app): State<Arc<Emulator>>, headers: HeaderMap, body: Bytes) -> Response {
    bump(&app.counters.single_requests, 1);
    if let Err(denied) = authorize(&app, &headers, true) {
        return denied.into_response();
    }
    let Ok(root) = serde_json::from_slice::<Value>(&body) else {
        return unparseable_body();
    };
    let event = match root.get("event") {
        Some(event @ Value::Object(fields)) if !fields.is_empty() => event,
        _ => return param_missing("event"),
    };
    let received_at = now_millis();
    let event = match parse_event(event, received_at) {
        Ok(event) => event,
        Err(errors) => return unprocessable(errors.to_json()),
    };
    let lago_id = app.next_lago_id();
    let created_at = iso_seconds(received_at);
    let mut body = Vec::with_capacity(512);
    body.extend_from_slice(b"{\"event\":");
    write_event(&mut body, &lago_id, &event, &created_at);
    body.push(b'}');
    let errors_of = [event.clone()];
    let outcome = app.store().commit(vec![(lago_id, event)], received_at);
    match outcome {
        Commit::Stored { duplicates } => {
            app.report_event_errors(&[&errors_of[0]]);
            // A ClickHouse replacement is a duplicate, not one more stored event.
            bump(&app.counters.events_stored, 1 - duplicates as u64);
            bump(&app.counters.duplicates, duplicates as u64);
            json_bytes(StatusCode::OK, body)
        }
        Commit::Rejected { .. } => {
            bump(&app.counters.duplicates, 1);
            unprocessable(json!({"transaction_id": ["value_already_exist"]}))
        }
    }
}

async fn create_batch(
    State(app): State<Arc<Emulator>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    bump(&app.counters.batch_requests, 1);
    if let Err(denied) = authorize(&app, &headers, true) {
        return denied.into_response();
    }
    // The events are read from the body's text, not built into a JSON tree first: the tree
    // was most of the emulator's time per event (docs/benchmarks.md).
    let Ok(root) = object_fields(&body, &["events"]) else {
        return unparseable_body();
    };
    // Lago's batch service answers a missing, empty or non-array `events` with `no_events`.
    let events = match root
        .and_then(|[events]| events)
        .map(|events| serde_json::from_str::<Vec<&RawValue>>(events.get()))
    {
        Some(Ok(events)) if !events.is_empty() => events,
        _ => return unprocessable(json!({"events": ["no_events"]})),
    };
    if events.len() > app.batch_max_length {
        return unprocessable(json!({"events": ["too_many_events"]}));
    }
    let received_at = now_millis();
    let mut parsed = Vec::with_capacity(events.len());
    let mut invalid: Vec<(usize, FieldErrors)> = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        match parse_raw_event(event, received_at) {
            Ok(event) => parsed.push((i, event)),
            Err(errors) => invalid.push((i, errors)),
        }
    }

    if !invalid.is_empty() {
        // Nothing is stored; the valid events are still checked for duplicates so the answer
        // names every problem at once, as Lago's validate-everything-first pass does.
        let candidates: Vec<&ParsedEvent> = parsed.iter().map(|(_, e)| e).collect();
        let duplicates = app.store().duplicate_indexes(&candidates);
        bump(&app.counters.duplicates, duplicates.len() as u64);
        let mut details: Vec<(usize, Value)> = invalid
            .into_iter()
            .map(|(i, errors)| (i, errors.to_json()))
            .collect();
        details.extend(duplicates.into_iter().map(|d| {
            (
                parsed[d].0,
                json!({"transaction_id": ["value_already_exist"]}),
            )
        }));
        return unprocessable_by_index(details);
    }

    let created_at = iso_seconds(received_at);
    let mut body = Vec::with_capacity(64 + parsed.len() * 400);
    body.extend_from_slice(b"{\"events\":[");
    let mut batch = Vec::with_capacity(parsed.len());
    for (n, (_, event)) in parsed.into_iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        let lago_id = app.next_lago_id();
        write_event(&mut body, &lago_id, &event, &created_at);
        batch.push((lago_id, event));
    }
    body.extend_from_slice(b"]}");
    let count = batch.len() as u64;
    // Copies only when the checks can run (a webhook is configured).
    let checked: Vec<ParsedEvent> = if app.webhook.is_some() {
        batch.iter().map(|(_, e)| e.clone()).collect()
    } else {
        Vec::new()
    };
    let outcome = app.store().commit(batch, received_at);
    match outcome {
        Commit::Stored { duplicates } => {
            app.report_event_errors(&checked.iter().collect::<Vec<_>>());
            bump(&app.counters.events_stored, count - duplicates as u64);
            bump(&app.counters.duplicates, duplicates as u64);
            json_bytes(StatusCode::OK, body)
        }
        Commit::Rejected { duplicate_indexes } => {
            bump(&app.counters.duplicates, duplicate_indexes.len() as u64);
            unprocessable_by_index(
                duplicate_indexes
                    .into_iter()
                    .map(|i| (i, json!({"transaction_id": ["value_already_exist"]})))
                    .collect(),
            )
        }
    }
}

async fn find_one(
    State(app): State<Arc<Emulator>>,
    headers: HeaderMap,
    Path(transaction_id): Path<String>,
) -> Response {
    bump(&app.counters.get_requests, 1);
    if let Err(denied) = authorize(&app, &headers, false) {
        return denied.into_response();
    }
    let mut body = Vec::with_capacity(512);
    {
        let store = app.store();
        let Some(record) = store.find(&transaction_id) else {
            return json_value(
                StatusCode::NOT_FOUND,
                &json!({"status": 404, "error": "Not Found", "code": "event_not_found"}),
            );
        };
        body.extend_from_slice(b"{\"event\":");
        write_event(
            &mut body,
            &record.lago_id,
            &record.event,
            &iso_seconds(record.received_at_millis),
        );
        body.push(b'}');
    }
    json_bytes(StatusCode::OK, body)
}

/// `GET /api/v1/subscriptions/{external_id}`: a subscription object for a known id, else
/// Lago's 404 `subscription_not_found`.
async fn find_subscription(
    State(app): State<Arc<Emulator>>,
    headers: HeaderMap,
    Path(external_id): Path<String>,
) -> Response {
    if let Err(denied) = authorize(&app, &headers, false) {
        return denied.into_response();
    }
    let known = app
        .known_subscriptions
        .as_ref()
        .is_none_or(|known| known.contains(&external_id));
    if !known {
        return json_value(
            StatusCode::NOT_FOUND,
            &json!({"status": 404, "error": "Not Found", "code": "subscription_not_found"}),
        );
    }
    let now = iso_seconds(now_millis());
    json_value(
        StatusCode::OK,
        &json!({"subscription": {
            "lago_id": app.next_lago_id().to_string(),
            "external_id": external_id,
            "lago_customer_id": app.next_lago_id().to_string(),
            "external_customer_id": external_id,
            "name": null,
            "plan_code": "emulated_plan",
            "status": "active",
            "billing_time": "calendar",
            "subscription_at": now,
            "started_at": now,
            "ending_at": null,
            "terminated_at": null,
            "canceled_at": null,
            "created_at": now,
            "previous_plan_code": null,
            "next_plan_code": null,
            "downgrade_plan_date": null,
            "trial_ended_at": null,
        }}),
    )
}

/// `GET /api/v1/webhooks/public_key`: Base64 of the PEM of the key that verifies `jwt`
/// webhook signatures, as plain text (Lago's `Base64.encode64(RsaPublicKey.to_s)`).
async fn webhook_public_key(State(app): State<Arc<Emulator>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&app, &headers, false) {
        return denied.into_response();
    }
    match app.jwt() {
        Some(signer) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            super::webhooks::public_key_body(&signer.public_pem),
        )
            .into_response(),
        None => server_error(500),
    }
}

/// Any other path: Rails' routing error, as JSON.
pub(crate) async fn not_found() -> Response {
    json_value(
        StatusCode::NOT_FOUND,
        &json!({"status": 404, "error": "Not Found"}),
    )
}

/// Why a request was turned away before its body was read.
enum Denied {
    /// No key, or not one the emulator knows: 401.
    Unauthorized,
    /// The read-only key on a write: 403.
    ReadOnly,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Unauthorized => json_value(
                StatusCode::UNAUTHORIZED,
                &json!({"status": 401, "error": "Unauthorized"}),
            ),
            Denied::ReadOnly => json_value(
                StatusCode::FORBIDDEN,
                &json!({"status": 403, "error": "Forbidden",
                        "code": "write_action_not_allowed_for_event"}),
            ),
        }
    }
}

/// Bearer key check. `write` requests need the write key; the read-only key gets 403 there.
fn authorize(app: &Emulator, headers: &HeaderMap, write: bool) -> Result<(), Denied> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .filter(|key| !key.is_empty());
    let Some(key) = key else {
        return Err(Denied::Unauthorized);
    };
    let digest = Sha256::digest(key.as_bytes());
    if bool::from(digest.as_slice().ct_eq(&app.api_key_hash)) {
        return Ok(());
    }
    match &app.read_only_key_hash {
        Some(hash) if bool::from(digest.as_slice().ct_eq(hash)) => {
            if write {
                Err(Denied::ReadOnly)
            } else {
                Ok(())
            }
        }
        _ => Err(Denied::Unauthorized),
    }
}

pub(crate) fn key_hash(key: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(Sha256::digest(key.as_bytes()).as_slice());
    out
}

fn param_missing(param: &str) -> Response {
    json_value(
        StatusCode::BAD_REQUEST,
        &json!({"status": 400, "error": format!(
            "BadRequest: param is missing or the value is empty or invalid: {param}")}),
    )
}

/// A body that is not JSON: Rails fails to parse the parameters and answers a bare 400.
fn unparseable_body() -> Response {
    json_value(
        StatusCode::BAD_REQUEST,
        &json!({"status": 400, "error": "Bad Request"}),
    )
}

fn unprocessable(error_details: Value) -> Response {
    json_value(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                "error_details": error_details}),
    )
}

fn unprocessable_by_index(mut details: Vec<(usize, Value)>) -> Response {
    details.sort_by_key(|(i, _)| *i);
    let mut map = Map::new();
    for (i, errors) in details {
        match map.get_mut(&i.to_string()) {
            // An event both invalid and a duplicate: one object with every field's errors.
            Some(Value::Object(existing)) => {
                if let Value::Object(more) = errors {
                    existing.extend(more);
                }
            }
            _ => {
                map.insert(i.to_string(), errors);
            }
        }
    }
    unprocessable(Value::Object(map))
}

fn server_error(status: u16) -> Response {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| !s.is_informational())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_value(
        status,
        &json!({"status": status.as_u16(),
                "error": status.canonical_reason().unwrap_or("Server Error")}),
    )
}

/// What nginx answers above `client_max_body_size`: 413 with an HTML page, not Lago's JSON.
fn too_large() -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/html"))],
        "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n\
         <center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n\
         </body>\r\n</html>\r\n",
    )
        .into_response()
}

fn rate_limited(reset_secs: u64, retry_after: bool) -> Response {
    let mut response = json_value(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({"status": 429, "error": "Too Many Requests"}),
    );
    let headers = response.headers_mut();
    let reset = HeaderValue::from(reset_secs);
    headers.insert("x-ratelimit-limit", HeaderValue::from_static(RATE_LIMIT));
    headers.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
    headers.insert("x-ratelimit-reset", reset.clone());
    if retry_after {
        headers.insert(header::RETRY_AFTER, reset);
    }
    response
}

fn dropped() -> Response {
    let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
    response.extensions_mut().insert(DropConnection);
    response
}

fn json_value(status: StatusCode, body: &Value) -> Response {
    json_bytes(status, body.to_string().into_bytes())
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `2022-04-29T08:59:51.123Z` (the event timestamp, as Lago's serializer writes it).
pub(crate) fn iso_millis(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `2022-04-29T08:59:51Z` (`created_at`, whole seconds).
fn iso_seconds(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Appends one EventObject, fields in the order Lago's serializer writes them.
fn write_event(out: &mut Vec<u8>, lago_id: &Uuid, e: &ParsedEvent, created_at: &str) {
    fn string(out: &mut Vec<u8>, s: &str) {
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
    fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => string(out, s),
            None => out.extend_from_slice(b"null"),
        }
    }
    let mut id = Uuid::encode_buffer();
    out.extend_from_slice(b"{\"lago_id\":\"");
    out.extend_from_slice(lago_id.hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"transaction_id\":");
    string(out, &e.transaction_id);
    out.extend_from_slice(b",\"lago_customer_id\":null,\"code\":");
    string(out, &e.code);
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(iso_millis(e.timestamp_millis).as_bytes());
    out.extend_from_slice(b"\",\"precise_total_amount_cents\":");
    opt_string(out, e.precise_total_amount_cents.as_deref());
    out.extend_from_slice(b",\"properties\":");
    out.extend_from_slice(e.properties_json.as_bytes());
    out.extend_from_slice(b",\"lago_subscription_id\":null,\"external_subscription_id\":");
    opt_string(out, e.external_subscription_id.as_deref());
    out.extend_from_slice(b",\"created_at\":\"");
    out.extend_from_slice(created_at.as_bytes());
    out.extend_from_slice(b"\"}");
}
