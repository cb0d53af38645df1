//! `tally ship --webhook-addr`: receives Lago's webhooks on `POST /lago/webhooks` and acts on
//! `events.errors`, Lago's report of stored events it cannot bill (docs/operations.md, "Knowing
//! that Lago bills it").
//!
//! - Signatures are checked before anything is read. `X-Lago-Signature-Algorithm: hmac`:
//!   `X-Lago-Signature` = Base64(HMAC-SHA256(raw body, LAGO_WEBHOOK_HMAC_KEY)), compared in
//!   constant time. `jwt` (Lago's default): an RS256 JWT whose `data` claim is the body, checked
//!   with Lago's public key from `GET /api/v1/webhooks/public_key` (Base64 of a PEM), fetched
//!   with the API key on first use and cached. A missing or wrong signature, an unknown
//!   algorithm, no HMAC key, or no public key to be had: 401, so Lago retries and its webhook
//!   log shows it.
//! - A body over 1 MiB: 413. A repeated `X-Lago-Unique-Key` (Lago retries until it gets a 2xx):
//!   200, not acted on twice (remembered in memory, the last [`SEEN_KEYS`] keys).
//! - Webhook types tally does not use: 200 and ignored (a non-2xx would make Lago retry them).
//! - `events.errors`: each named transaction_id that tally acked moves to the outbox state
//!   lago-error with the category (`invalid_code`, `missing_aggregation_property`,
//!   `invalid_filter_values`, `missing_group_key`) as reason; ids tally never sent are logged.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::metrics::ShipMetrics;
use crate::ship::ApiKey;
use crate::ship::outbox::SharedOutbox;
use crate::ship::outbox::with_outbox;

/// Largest webhook body read.
pub const MAX_BODY: usize = 1024 * 1024;
/// How many `X-Lago-Unique-Key`s are remembered to ignore Lago's retries.
pub const SEEN_KEYS: usize = 10_000;
/// The path Lago is configured to post to.
pub const PATH: &str = "/lago/webhooks";
/// The categories of `events.errors`, as Lago names them.
pub const CATEGORIES: [&str; 4] = [
    "invalid_code",
    "missing_aggregation_property",
    "invalid_filter_values",
    "missing_group_key",
];

/// Where the receiver listens and how it checks signatures.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub addr: SocketAddr,
    /// Lago's HMAC signature token (Developers > Webhooks), `LAGO_WEBHOOK_HMAC_KEY`.
    pub hmac_key: Option<ApiKey>,
    /// A socket already listening on `addr`, used instead of binding it: code that must name the
    /// receiver's address before the shipper starts (the demo tells its emulator) binds first,
    /// since a port found free and released can be taken by anything before it is bound again.
    pub listener: Option<Arc<std::net::TcpListener>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen for Lago webhooks on {addr} (TALLY_WEBHOOK_ADDR): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the Lago webhook listener failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Base64 of HMAC-SHA256 of `body` keyed with `key`: Lago's `X-Lago-Signature` for `hmac`.
pub fn hmac_signature(key: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `signature` (Base64) is the HMAC of `body` with `key`, in constant time.
pub fn hmac_valid(key: &[u8], body: &[u8], signature: &str) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// Where Lago's webhook public key is fetched from (`jwt` signatures).
#[derive(Debug, Clone)]
pub struct PublicKeySource {
    pub api_base: reqwest::Url,
    pub api_key: ApiKey,
}

impl PublicKeySource {
    async fn fetch(&self) -> Result<jsonwebtoken::DecodingKey, String> {
        let url = format!(
            "{}/api/v1/webhooks/public_key",
            self.api_base.as_str().trim_end_matches('/')
        );
        let mut auth =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.api_key.expose()))
                .map_err(|_| "LAGO_API_KEY cannot be used in an HTTP header".to_owned())?;
        auth.set_sensitive(true);
        let response = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?
            .get(&url)
            .header(reqwest::header::AUTHORIZATION, auth)
            .send()
            .await
            .map_err(|e| format!("GET /api/v1/webhooks/public_key failed: {e}"))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() || body.len() > 64 * 1024 {
            return Err(format!(
                "GET /api/v1/webhooks/public_key answered HTTP {}: {}",
                status.as_u16(),
                crate::ship::lago::body_text(&body)
            ));
        }
        // Base64 of the PEM, in lines (Ruby's `Base64.encode64`).
        let compact: Vec<u8> = body
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let pem = base64::engine::general_purpose::STANDARD
            .decode(&compact)
            .map_err(|e| format!("Lago's webhook public key is not Base64: {e}"))?;
        jsonwebtoken::DecodingKey::from_rsa_pem(&pem)
            .map_err(|e| format!("Lago's webhook public key is not an RSA public key PEM: {e}"))
    }
}

/// Checks a `jwt` signature: RS256 with Lago's key, and the `data` claim is this body.
fn jwt_valid(key: &jsonwebtoken::DecodingKey, token: &str, body: &[u8]) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Claims {
        data: String,
    }
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    // Lago's webhook JWTs carry no expiry; the body they sign is what is checked.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<Claims>(token.trim(), key, &validation)
        .map_err(|e| format!("X-Lago-Signature is not a valid JWT from Lago: {e}"))?
        .claims;
    // Lago signs `payload.to_json` and posts the same text; compared as JSON too, in case a
    // proxy re-encoded the body.
    let same = claims.data.as_bytes() == body
        || matches!(
            (serde_json::from_str::<Value>(&claims.data), serde_json::from_slice::<Value>(body)),
            (Ok(a), Ok(b)) if a == b
        );
    if same {
        Ok(())
    } else {
        Err("the JWT in X-Lago-Signature signs another body".into())
    }
}

/// Why a webhook was refused (logged; the answer is 401 either way).
async fn signature_problem(rx: &Receiver, headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let settings = &rx.settings;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let algorithm = header("x-lago-signature-algorithm").unwrap_or("jwt");
    let Some(signature) = header("x-lago-signature") else {
        return Some("no X-Lago-Signature header".into());
    };
    match algorithm {
        "hmac" => match &settings.hmac_key {
            None => {
                Some("an hmac-signed webhook arrived but LAGO_WEBHOOK_HMAC_KEY is not set".into())
            }
            Some(key) if hmac_valid(key.expose().as_bytes(), body, signature) => None,
            Some(_) => Some(
                "X-Lago-Signature does not match the body (is LAGO_WEBHOOK_HMAC_KEY Lago's HMAC \
                 signature token?)"
                    .into(),
            ),
        },
        "jwt" => {
            let key = match rx.public_key().await {
                Ok(key) => key,
                Err(e) => return Some(format!("cannot check a jwt signature: {e}")),
            };
            jwt_valid(&key, signature, body).err()
        }
        other => Some(format!(
            "signature algorithm {:?} is unknown (Lago uses hmac or jwt)",
            crate::text::printable(other)
        )),
    }
}

/// The receiver's shared state.
struct Receiver {
    settings: WebhookSettings,
    public_key_source: Option<PublicKeySource>,
    /// Fetched once; a failed fetch is tried again with the next webhook.
    public_key: tokio::sync::Mutex<Option<Arc<jsonwebtoken::DecodingKey>>>,
    outbox: SharedOutbox,
    metrics: Option<ShipMetrics>,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Receiver {
    async fn public_key(&self) -> Result<Arc<jsonwebtoken::DecodingKey>, String> {
        let mut cached = self.public_key.lock().await;
        if let Some(key) = cached.as_ref() {
            return Ok(key.clone());
        }
        let source = self
            .public_key_source
            .as_ref()
            .ok_or_else(|| "no Lago API to fetch the webhook public key from".to_owned())?;
        let key = Arc::new(source.fetch().await?);
        *cached = Some(key.clone());
        Ok(key)
    }

    fn seen_before(&self, key: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .contains(key)
    }

    fn remember(&self, key: String) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.0.insert(key.clone()) {
            seen.1.push_back(key);
            if seen.1.len() > SEEN_KEYS
                && let Some(old) = seen.1.pop_front()
            {
                seen.0.remove(&old);
            }
        }
    }
}

/// The receiver's routes, for [`serve`] and tests.
pub fn router(
    settings: WebhookSettings,
    public_key_source: Option<PublicKeySource>,
    outbox: SharedOutbox,
    metrics: Option<ShipMetrics>,
) -> Router {
    let receiver = Arc::new(Receiver {
        settings,
        public_key_source,
        public_key: tokio::sync::Mutex::new(None),
        outbox,
        metrics,
        seen: Mutex::new((HashSet::new(), VecDeque::new())),
    });
    Router::new()
        .route(PATH, post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(receiver)
}

/// Binds `settings.addr`; returns the bound address and the serving future (ends on `stop`).
pub async fn serve(
    settings: WebhookSettings,
    public_key_source: Option<PublicKeySource>,
    outbox: SharedOutbox,
    metrics: Option<ShipMetrics>,
    stop: CancellationToken,
) -> Result<
    (
        SocketAddr,
        impl Future<Output = Result<(), WebhookError>> + Send + 'static,
    ),
    WebhookError,
> {
    let addr = settings.addr;
    let listener = match &settings.listener {
        Some(bound) => bound
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map_err(|source| WebhookError::Bind { addr, source })?,
        None => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| WebhookError::Bind { addr, source })?,
    };
    let bound = listener
        .local_addr()
        .map_err(|source| WebhookError::Bind { addr, source })?;
    let app = router(settings, public_key_source, outbox, metrics);
    let fut = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .map_err(WebhookError::Serve)
    };
    Ok((bound, fut))
}

async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(problem) = signature_problem(&rx, &headers, &body).await {
        tracing::warn!(problem = %problem, "refused a Lago webhook (401)");
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid or missing webhook signature"})),
        )
            .into_response();
    }
    let unique_key = headers
        .get("x-lago-unique-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(key) = &unique_key
        && rx.seen_before(key)
    {
        tracing::debug!(unique_key = %key, "Lago webhook already handled; ignored");
        return ok("duplicate");
    }
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        tracing::warn!("a signed Lago webhook is not JSON; ignored");
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "body is not JSON"})),
        )
            .into_response();
    };
    let kind = payload
        .get("webhook_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind != "events.errors" {
        tracing::debug!(webhook_type = %crate::text::printable(kind), "Lago webhook not used by tally; ignored");
        if let Some(key) = unique_key {
            rx.remember(key);
        }
        return ok("ignored");
    }
    let errors = payload
        .get("events_errors")
        .or_else(|| {
            payload.get(
                payload
                    .get("object_type")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            )
        })
        .cloned()
        .unwrap_or(Value::Null);
    match apply_event_errors(&rx, &errors).await {
        Ok(()) => {
            if let Some(key) = unique_key {
                rx.remember(key);
            }
            ok("applied")
        }
        Err(e) => {
            // Lago retries a non-2xx: the outbox may be writable again by then.
            tracing::error!(error = %e, "cannot record Lago's events.errors in the outbox; Lago will retry");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "outbox unavailable"})),
            )
                .into_response()
        }
    }
}

fn ok(outcome: &str) -> Response {
    (StatusCode::OK, Json(json!({"outcome": outcome}))).into_response()
}

async fn apply_event_errors(
    rx: &Receiver,
    errors: &Value,
) -> Result<(), crate::ship::outbox::OutboxTaskError> {
    for category in CATEGORIES {
        let ids: Vec<String> = errors
            .get(category)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() {
            continue;
        }
        let marks = with_outbox(&rx.outbox, move |ob| {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            ob.mark_lago_error(&refs, category)
        })
        .await?;
        if !marks.marked.is_empty() {
            tracing::warn!(
                category,
                events = marks.marked.len(),
                "Lago reported events it stores but cannot bill (events.errors); they are now in \
                 state lago-error: see `tally queue list --state lago-error` and docs/operations.md"
            );
            if let Some(m) = &rx.metrics {
                m.record_lago_errors(category, marks.marked.len() as u64);
            }
        }
        for id in &marks.unknown {
            tracing::info!(
                category,
                transaction_id = %crate::text::printable(id),
                "events.errors names an event this outbox never had; nothing to do here"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_signatures_match_only_their_key_and_body() {
        // RFC 4231 test case 2 (digest 5bdcc146…3843), Base64 as Python's hmac module gives it.
        let sig = hmac_signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM=");
        assert!(hmac_valid(b"Jefe", b"what do ya want for nothing?", &sig));
        assert!(!hmac_valid(b"Jeff", b"what do ya want for nothing?", &sig));
        assert!(!hmac_valid(b"Jefe", b"what do ya want for nothing!", &sig));
        assert!(!hmac_valid(b"Jefe", b"x", "not base64 !"));
    }

    /// The demo binds the receiver's port before the shipper starts; the receiver must serve on
    /// that very socket (binding the address again would fail while it is held).
    #[tokio::test]
    async fn a_receiver_given_a_bound_socket_serves_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = crate::ship::outbox::Outbox::open_in(dir.path())
            .unwrap()
            .shared();
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let settings = WebhookSettings {
            addr,
            hmac_key: Some(ApiKey::new("hook-key".to_owned())),
            listener: Some(Arc::new(held)),
        };
        let stop = CancellationToken::new();
        let (bound, served) = serve(settings, None, outbox, None, stop.clone())
            .await
            .unwrap();
        assert_eq!(bound, addr);
        let served = tokio::spawn(served);

        let url = format!("http://{addr}{PATH}");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let body = br#"{"webhook_type":"invoice.created"}"#;
        let signed = http
            .post(&url)
            .header("x-lago-signature-algorithm", "hmac")
            .header("x-lago-signature", hmac_signature(b"hook-key", body))
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(signed.status(), StatusCode::OK);
        let answer: Value = signed.json().await.unwrap();
        assert_eq!(answer["outcome"], "ignored");
        let unsigned = http.post(&url).body(body.to_vec()).send().await.unwrap();
        assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);

        stop.cancel();
        served.await.unwrap().unwrap();
    }
}
