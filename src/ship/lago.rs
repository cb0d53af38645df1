//! The Lago events client: one `POST /api/v1/events/batch` per call, and the classification of
//! Lago's answer into what the sender must do (docs/lago-emulator.md).
//!
//! The request body is assembled from the event bytes the claim wrote (`ship::event`), without
//! parsing them again. The API key goes only into a header marked sensitive; reqwest's errors carry the
//! URL at most, never headers, so no error or log line can contain the key.
//!
//! Only Lago's own success acks a batch: a 200 whose body is the `{"events": [...]}` envelope
//! with one entry per event sent. Redirects are never followed (a 302 followed as a GET with no
//! body answers 200 while nothing reached Lago; a 307 would send the events to another origin),
//! and an answer is read up to a limit, so a misbehaving server cannot make the shipper hold
//! hundreds of megabytes.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};

use crate::ship::settings::{LagoSettings, Tuning};

/// Longest part of a Lago answer kept in an error or a dead event's reason.
const MAX_BODY_IN_REASON: usize = 2000;
/// The least of Lago's answer that is read (see [`answer_limit`]).
pub const MIN_ANSWER_LIMIT: usize = 1024 * 1024;

/// How much of an answer is read before it is an error: Lago's 200 echoes every event (a little
/// longer than the request), so twice the batch byte cap, and never less than 1 MiB.
pub fn answer_limit(batch_max_bytes: usize) -> usize {
    batch_max_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024)
        .max(MIN_ANSWER_LIMIT)
}

/// What Lago said about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 200 with Lago's envelope, one entry per event sent: every event stored.
    Accepted,
    /// A 2xx that is not Lago's answer to this batch (another status, another body, another
    /// number of events): not an ack; the events stay pending and are sent again.
    NotAnAck { status: u16, body: String },
    /// 3xx: never followed (it is not an ack, and following it would send the events elsewhere
    /// or drop their body). `location` is where it pointed (credentials removed); `to_https` when
    /// an `http://` URL was redirected to `https://`, the usual cause.
    Redirected {
        status: u16,
        location: Option<String>,
        to_https: bool,
    },
    /// 413: the body is too large for Lago or a proxy in front of it; nothing was stored.
    TooLarge { body: String },
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
    /// The answer was longer than the shipper reads; whatever it said is not trusted.
    #[error(
        "Lago's answer (HTTP {status}) is longer than {limit} bytes; it is not read further and \
         the events stay pending (is LAGO_API_BASE really Lago?)"
    )]
    AnswerTooLong { status: u16, limit: usize },
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
    answer_limit: usize,
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
            // A redirect is an answer to judge, never to follow (see the module doc).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Self {
            http,
            batch_url: lago.batch_url(),
            auth,
            timeout: tuning.request_timeout,
            answer_limit: answer_limit(tuning.batch_max_bytes),
        })
    }

    /// Sends one batch (each event's transaction id and JSON object) and classifies the answer.
    pub async fn send_batch<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Answer, SendError> {
        // In a block: the iterator must not be held across the awaits below.
        let (sent, body) = {
            let events = events.into_iter();
            let mut sent = Vec::with_capacity(events.size_hint().0);
            let body = batch_body(events.map(|(id, event)| {
                sent.push(id);
                event
            }));
            (sent, body)
        };
        let mut response = self
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
        let too_long = SendError::AnswerTooLong {
            status: status.as_u16(),
            limit: self.answer_limit,
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.answer_limit as u64)
        {
            return Err(too_long);
        }
        // Streamed, stopping at the limit: a length header may be absent or wrong. Sized from it
        // when there is one (the echo of a batch is about a kilobyte per event), so the body is
        // not copied again as it grows.
        let expected = response.content_length().unwrap_or(0) as usize;
        let mut body = Vec::with_capacity(expected.min(self.answer_limit));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(e))?
        {
            if body.len() + chunk.len() > self.answer_limit {
                return Err(too_long);
            }
            body.extend_from_slice(&chunk);
        }
        let answer = classify(status, &headers, &body, &sent);
        Ok(match answer {
            Answer::Redirected { status, .. } => {
                let location = location_of(Some(&self.batch_url), &headers);
                let to_https = self.batch_url.starts_with("http://")
                    && location
                        .as_deref()
                        .is_some_and(|l| l.starts_with("https://"));
                Answer::Redirected {
                    status,
                    location,
                    to_https,
                }
            }
            other => other,
        })
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

/// Where a redirect points: the `Location` header (resolved against `request_url` when given),
/// with any user name or password removed and control characters escaped, cut to a sane length.
pub fn location_of(request_url: Option<&str>, headers: &HeaderMap) -> Option<String> {
    let raw = headers.get(reqwest::header::LOCATION)?;
    let raw = String::from_utf8_lossy(raw.as_bytes());
    let resolved = match request_url {
        Some(base) => reqwest::Url::parse(base).and_then(|base| base.join(raw.trim())),
        None => reqwest::Url::parse(raw.trim()),
    };
    let text = match resolved {
        Ok(url) => crate::ship::settings::redact_url(&url),
        Err(_) => raw.into_owned(),
    };
    Some(body_text(crate::text::printable(&text).as_bytes()))
}

/// What the shipper records for a redirect: where it pointed and what to do.
pub fn redirect_note(status: u16, location: Option<&str>, to_https: bool) -> String {
    let mut note = format!(
        "Lago answered {status}, a redirect to {}; tally does not follow redirects (a redirect \
         is not an acknowledgement), so the events stay pending",
        location.unwrap_or("(no Location header)")
    );
    if to_https {
        note.push_str(
            ". An http:// LAGO_API_BASE redirected to https:// is the likely cause: set \
             LAGO_API_BASE to the https:// URL",
        );
    } else {
        note.push_str(". Set LAGO_API_BASE to the URL that answers without redirecting");
    }
    note
}

/// Whether `body` is Lago's success envelope for a batch of the events whose transaction ids
/// are `sent`: its echo of each of them, in order (the common case, checked without parsing),
/// or else an `events` array of as many entries, read by serde.
fn is_envelope(body: &[u8], sent: &[&str]) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope {
        events: Vec<serde::de::IgnoredAny>,
    }
    echoes(body, sent)
        || serde_json::from_slice::<Envelope>(body).is_ok_and(|e| e.events.len() == sent.len())
}

/// An echoed event's id, as Lago writes it (compact JSON, as the emulator does too).
const ECHOED_ID: &[u8] = b"\"transaction_id\":\"";

/// Whether `body` is `{"events":[...]}` naming, under `"transaction_id":"`, exactly the ids of
/// `sent`, in order. Reading the echo this way costs a fraction of parsing it (about a kilobyte
/// per event; docs/benchmarks.md). The key cannot occur inside a JSON string: its second quote
/// follows a `d`, where a quote in a string follows a backslash. Only ids that every JSON
/// writer leaves unescaped are compared (Rails escapes `<`, `>` and `&`); any other answer is
/// left to serde.
fn echoes(body: &[u8], sent: &[&str]) -> bool {
    let plain = |id: &str| {
        id.bytes()
            .all(|b| (0x20..0x7f).contains(&b) && !b"\"\\<>&".contains(&b))
    };
    if !(body.starts_with(b"{\"events\":[") && body.ends_with(b"]}")) {
        return false;
    }
    let mut ids = sent.iter();
    for at in memchr::memmem::find_iter(body, ECHOED_ID) {
        let value = &body[at + ECHOED_ID.len()..];
        let Some(id) = ids.next() else {
            return false;
        };
        if !(plain(id) && value.starts_with(id.as_bytes()) && value.get(id.len()) == Some(&b'"')) {
            return false;
        }
    }
    ids.next().is_none()
}

/// Turns Lago's answer to a batch of the events whose transaction ids are `sent` into what to
/// do. Pure, so every case is unit-tested. A redirect's `to_https` is left false here (the client
/// knows the request URL).
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8], sent: &[&str]) -> Answer {
    let text = || body_text(body);
    match status.as_u16() {
        200 if is_envelope(body, sent) => Answer::Accepted,
        code @ 200..=299 => Answer::NotAnAck {
            status: code,
            body: text(),
        },
        code @ 300..=399 => Answer::Redirected {
            status: code,
            location: location_of(None, headers),
            to_https: false,
        },
        413 => Answer::TooLarge { body: text() },
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
            &[],
        )
    }

    #[test]
    fn classifies_every_status_class() {
        assert_eq!(answer(200, r#"{"events":[]}"#), Answer::Accepted);
        assert!(matches!(
            answer(307, ""),
            Answer::Redirected {
                status: 307,
                location: None,
                ..
            }
        ));
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

    /// Regression (docs/reliability.md, "Findings"): any 2xx acked the batch, whatever its body.
    #[test]
    fn only_lagos_envelope_for_the_batch_is_an_ack() {
        let at = |status: u16, body: &str, sent: &[&str]| {
            classify(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                body.as_bytes(),
                sent,
            )
        };
        let two = r#"{"events":[{"transaction_id":"a"},{"transaction_id":"b"}]}"#;
        assert_eq!(at(200, two, &["a", "b"]), Answer::Accepted);
        for (status, body, sent) in [
            (200, "<html>welcome</html>", &["a", "b"][..]),
            (200, "", &["a", "b"]),
            (200, r#"{"event":{}}"#, &["a"]),
            (200, r#"{"events":{}}"#, &["a"]),
            (200, two, &["a", "b", "c"]),
            (201, two, &["a", "b"]),
            (204, "", &[]),
        ] {
            assert!(
                matches!(at(status, body, sent), Answer::NotAnAck { status: s, .. } if s == status),
                "{status} {body:?} {sent:?}"
            );
        }
    }

    #[test]
    fn redirects_and_413_are_their_own_answers() {
        let mut h = HeaderMap::new();
        h.insert(
            "location",
            HeaderValue::from_static("https://me:pw@lago.example.com/api/v1/events/batch"),
        );
        let a = classify(StatusCode::FOUND, &h, b"", &["a"]);
        let Answer::Redirected {
            status, location, ..
        } = a
        else {
            panic!("{a:?}")
        };
        assert_eq!(status, 302);
        let location = location.unwrap();
        assert!(!location.contains("pw"), "{location}");
        assert!(location.contains("lago.example.com/api/v1/events/batch"));
        h.insert("location", HeaderValue::from_static("/elsewhere"));
        assert_eq!(
            location_of(Some("http://127.0.0.1:9/api/v1/events/batch"), &h).as_deref(),
            Some("http://127.0.0.1:9/elsewhere")
        );
        let note = redirect_note(307, Some("https://x/"), true);
        assert!(
            note.contains("307") && note.contains("https://x/"),
            "{note}"
        );
        assert!(note.contains("LAGO_API_BASE to the https:// URL"), "{note}");
        assert!(matches!(answer(413, "too big"), Answer::TooLarge { body } if body == "too big"));
    }

    #[test]
    fn the_answer_limit_follows_the_batch_cap() {
        assert_eq!(answer_limit(100 * 1024), MIN_ANSWER_LIMIT);
        assert_eq!(answer_limit(512 * 1024), (1024 + 64) * 1024);
        assert_eq!(answer_limit(4 << 20), (8 << 20) + 64 * 1024);
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

    /// The emulator's answer to a real batch is read by the fast path; whatever that path does
    /// not recognise is read by serde, which still acks the right count.
    #[tokio::test]
    async fn an_echo_of_each_id_in_order_is_an_ack_without_parsing_it() {
        let emu = crate::lago_emulator::spawn(
            crate::lago_emulator::EmulatorConfig {
                api_key: "k".into(),
                ..Default::default()
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let ids = ["tx-1", "tx-2", "tx-3:with.dots_and spaces"];
        let events: Vec<String> = ids
            .iter()
            .map(|id| {
                serde_json::json!({"transaction_id": id, "code": "llm_usage",
                    "external_subscription_id": "sub-1", "timestamp": 1795773600.25,
                    "properties": {"model": "gpt-4o \"quoted\"", "note": "transaction_id",
                                   "input_tokens": 3}})
                .to_string()
            })
            .collect();
        let body = reqwest::Client::new()
            .post(format!("{}/api/v1/events/batch", emu.base_url()))
            .bearer_auth("k")
            .header(CONTENT_TYPE, "application/json")
            .body(batch_body(events.iter().map(|e| e.as_bytes())))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(echoes(&body, &ids), "{}", String::from_utf8_lossy(&body));
        assert_eq!(
            classify(StatusCode::OK, &HeaderMap::new(), &body, &ids),
            Answer::Accepted
        );
        // Not this batch, or not in this order: not recognised here.
        for sent in [
            &ids[..2],
            &["tx-1", "tx-2", "tx-3:with.dots_and spaces", "tx-4"][..],
            &["tx-2", "tx-1", "tx-3:with.dots_and spaces"],
            &["tx-1", "tx-2", "tx-3"],
            &["tx-1", "tx-", "tx-3:with.dots_and spaces"],
        ] {
            assert!(!echoes(&body, sent), "{sent:?}");
        }
        emu.shutdown().await;

        // An id a JSON writer may escape, and an answer with spaces: serde decides, by count.
        let escaped = r#"{"events":[{"transaction_id":"a\u0026b"}]}"#.as_bytes();
        assert!(!echoes(escaped, &["a&b"]));
        assert_eq!(
            classify(StatusCode::OK, &HeaderMap::new(), escaped, &["a&b"]),
            Answer::Accepted
        );
        let spaced = br#"{"events": [{"transaction_id": "a"}, {"transaction_id": "b"}]}"#;
        assert!(!echoes(spaced, &["a", "b"]));
        assert_eq!(
            classify(StatusCode::OK, &HeaderMap::new(), spaced, &["a", "b"]),
            Answer::Accepted
        );
    }

    #[test]
    fn body_is_built_from_stored_bytes() {
        let events: [&[u8]; 2] = [br#"{"a":1}"#, br#"{"b":2}"#];
        assert_eq!(batch_body(events), br#"{"events":[{"a":1},{"b":2}]}"#);
    }

    /// Regression (found by the `lago_answer` fuzz target): a body of invalid UTF-8
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
