//! The Lago events client: one `POST /api/v1/events/batch` per call, and the classification of
//! Lago's answer into what the sender must do (shared/lago/BEHAVIOUR.md).
//!
//! The request body is assembled from the event bytes stored in the outbox, without parsing
//! them again. The API key goes only into a header marked sensitive; reqwest's errors carry the
//! URL at most, never headers, so no error or log line can contain the key.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};

use crate::ship::settings::{LagoSettings, Tuning};

/// Longest part of a Lago answer kept in an error or a dead event's reason.
const MAX_BODY_IN_REASON: usize = 2000;

/// What Lago said about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 200: every event stored.
    Accepted,
    /// 422 with errors keyed by event index: nothing was stored; the listed indexes were refused
    /// (or are duplicates), the others are fine and must be resent.
    PerIndex(BTreeMap<usize, IndexError>),
    /// 422 without per-index errors (e.g. `{"events":["too_many_events"]}`).
    Unprocessable { body: String },
    /// 400: the request itself was malformed.
    BadRequest { body: String },
    /// 401/403: the API key is wrong or may not write events.
    Unauthorized { status: u16, body: String },
    /// 429: wait (for the time given, if any) and send again.
    RateLimited { wait: Option<Duration> },
    /// 5xx or an unexpected status: a transient problem; back off and send again.
    Transient { status: u16, body: String },
}

/// Lago's verdict on one event of a 422 batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    /// `transaction_id: ["value_already_exist"]`: Lago already has it.
    AlreadyExists,
    /// Any other reason, in Lago's words.
    Refused(String),
}

/// The request never got an answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("Lago request timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to Lago: {0}")]
    Connect(String),
    #[error("Lago request failed: {0}")]
    Other(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// Sends batches to one Lago.
#[derive(Debug, Clone)]
pub struct LagoClient {
    http: reqwest::Client,
    batch_url: String,
    auth: HeaderValue,
    timeout: Duration,
}

impl LagoClient {
    pub fn new(lago: &LagoSettings, tuning: &Tuning) -> Result<Self, ClientError> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", lago.api_key.expose()))
            .map_err(|_| {
                ClientError::Build("LAGO_API_KEY cannot be used in an HTTP header".into())
            })?;
        // Keeps the value out of `Debug` output of the header map.
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .timeout(tuning.request_timeout)
            .connect_timeout(tuning.request_timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(tuning.batches_in_flight.max(1) * 2)
            .tcp_nodelay(true)
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Self {
            http,
            batch_url: lago.batch_url(),
            auth,
            timeout: tuning.request_timeout,
        })
    }

    /// Sends one batch (`events` are JSON objects) and classifies the answer.
    pub async fn send_batch<'a>(
        &self,
        events: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Answer, SendError> {
        let body = batch_body(events);
        let response = self
            .http
            .post(&self.batch_url)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        Ok(classify(status, &headers, &body))
    }

    fn transport_error(&self, e: reqwest::Error) -> SendError {
        let text = error_chain(&e);
        if e.is_timeout() {
            SendError::Timeout(self.timeout)
        } else if e.is_connect() {
            SendError::Connect(text)
        } else {
            SendError::Other(text)
        }
    }
}

/// `{"events":[e1,e2,...]}` from pre-built event bytes.
pub fn batch_body<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 * 1024);
    body.extend_from_slice(b"{\"events\":[");
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"]}");
    body
}

/// "error sending request for url (…): connection refused" — every cause, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Turns Lago's answer into what to do. Pure, so every case is unit-tested.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Answer {
    let text = || body_text(body);
    match status.as_u16() {
        200..=299 => Answer::Accepted,
        400 => Answer::BadRequest { body: text() },
        401 | 403 => Answer::Unauthorized {
            status: status.as_u16(),
            body: text(),
        },
        422 => match per_index(body) {
            Some(map) => Answer::PerIndex(map),
            None => Answer::Unprocessable { body: text() },
        },
        429 => Answer::RateLimited {
            wait: wait_from_headers(headers),
        },
        code => Answer::Transient {
            status: code,
            body: text(),
        },
    }
}

/// The answer body as text for a reason or log line, cut to a sane length.
pub fn body_text(body: &[u8]) -> String {
    let cut = &body[..body.len().min(MAX_BODY_IN_REASON)];
    let lossy = String::from_utf8_lossy(cut);
    let text = lossy.trim();
    // Each invalid byte becomes a 3-byte U+FFFD: cut again after the conversion, on a character
    // boundary, so the reason stays within the limit whatever Lago (or a proxy) sent.
    let mut end = text.len().min(MAX_BODY_IN_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut s = text[..end].to_owned();
    if body.len() > MAX_BODY_IN_REASON || end < text.len() {
        s.push('…');
    }
    s
}

/// `Retry-After` (seconds), else `X-RateLimit-Reset` (seconds until the window resets).
/// Values above an hour are taken as an hour: a broken header must not park the shipper for days.
pub fn wait_from_headers(headers: &HeaderMap) -> Option<Duration> {
    let secs = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
    };
    secs("retry-after")
        .or_else(|| secs("x-ratelimit-reset"))
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

/// Reads `error_details` of a 422 when every key is an event index. `None` when the errors are
/// about the batch as a whole (`events: [...]`) or the body is not what Lago sends.
fn per_index(body: &[u8]) -> Option<BTreeMap<usize, IndexError>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let details = v.get("error_details")?.as_object()?;
    if details.is_empty() {
        return None;
    }
    let mut out = BTreeMap::new();
    for (key, errors) in details {
        let index: usize = key.parse().ok()?;
        out.insert(index, index_error(errors));
    }
    Some(out)
}

fn index_error(errors: &serde_json::Value) -> IndexError {
    use serde_json::Value;
    let words = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    };
    match errors {
        Value::Object(fields) => {
            let duplicate = fields.get("transaction_id").is_some_and(|t| {
                t.as_array()
                    .is_some_and(|a| a.iter().any(|i| i.as_str() == Some("value_already_exist")))
                    || t.as_str() == Some("value_already_exist")
            });
            if duplicate {
                return IndexError::AlreadyExists;
            }
            let parts: Vec<String> = fields
                .iter()
                .map(|(field, v)| format!("{field}: {}", words(v)))
                .collect();
            IndexError::Refused(parts.join("; "))
        }
        other => IndexError::Refused(words(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        classify(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body.as_bytes(),
        )
    }

    #[test]
    fn classifies_every_status_class() {
        assert_eq!(answer(200, r#"{"events":[]}"#), Answer::Accepted);
        assert!(matches!(answer(400, "{}"), Answer::BadRequest { .. }));
        assert!(matches!(
            answer(401, r#"{"status":401,"error":"Unauthorized"}"#),
            Answer::Unauthorized { status: 401, .. }
        ));
        assert!(matches!(
            answer(403, "{}"),
            Answer::Unauthorized { status: 403, .. }
        ));
        assert!(matches!(
            answer(503, "down"),
            Answer::Transient { status: 503, .. }
        ));
        assert!(matches!(
            answer(404, "nope"),
            Answer::Transient { status: 404, .. }
        ));
        assert_eq!(answer(429, ""), Answer::RateLimited { wait: None });
    }

    #[test]
    fn reads_per_index_422_including_plain_string_values() {
        let body = r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"1":{"timestamp":["invalid_format"]},"2":{"transaction_id":["value_already_exist"]},"4":"expression_evaluation_failed: boom"}}"#;
        let Answer::PerIndex(map) = answer(422, body) else {
            panic!("expected per-index")
        };
        assert_eq!(
            map.get(&1),
            Some(&IndexError::Refused("timestamp: invalid_format".into()))
        );
        assert_eq!(map.get(&2), Some(&IndexError::AlreadyExists));
        assert_eq!(
            map.get(&4),
            Some(&IndexError::Refused(
                "expression_evaluation_failed: boom".into()
            ))
        );
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn batch_level_422_is_not_per_index() {
        let body = r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"events":["too_many_events"]}}"#;
        assert!(
            matches!(answer(422, body), Answer::Unprocessable { body } if body.contains("too_many_events"))
        );
        assert!(matches!(
            answer(422, "not json"),
            Answer::Unprocessable { .. }
        ));
    }

    #[test]
    fn rate_limit_waits_come_from_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", HeaderValue::from_static("3"));
        assert_eq!(wait_from_headers(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after", HeaderValue::from_static("1.5"));
        assert_eq!(wait_from_headers(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after", HeaderValue::from_static("999999"));
        assert_eq!(wait_from_headers(&h), Some(Duration::from_secs(3600)));
        h.insert("retry-after", HeaderValue::from_static("Wed, 21 Oct 2015"));
        assert_eq!(wait_from_headers(&h), Some(Duration::from_secs(3)));
    }

    #[test]
    fn body_is_built_from_stored_bytes() {
        let events: [&[u8]; 2] = [br#"{"a":1}"#, br#"{"b":2}"#];
        assert_eq!(batch_body(events), br#"{"events":[{"a":1},{"b":2}]}"#);
    }

    /// Regression (issue #6, found by the `lago_answer` fuzz target): a body of invalid UTF-8
    /// made a reason three times over the limit (each byte became a 3-byte U+FFFD).
    #[test]
    fn invalid_utf8_bodies_are_cut_to_the_limit_too() {
        let t = body_text(&[0xff; 1900]);
        assert!(
            t.len() <= MAX_BODY_IN_REASON + '…'.len_utf8(),
            "{}",
            t.len()
        );
        assert!(t.ends_with('…'));
        assert_eq!(body_text(b"  short  "), "short");
    }

    #[test]
    fn long_bodies_are_cut() {
        let long = "x".repeat(5000);
        let t = body_text(long.as_bytes());
        assert!(t.len() < 2100 && t.ends_with('…'));
    }
}
