//! Reads from Lago for `tally audit` and the shipper's subscription checks: `GET /api/v1/events/{transaction_id}` and
//! `GET /api/v1/subscriptions/{external_id}`, paced to a request rate and waiting out 429s the
//! way the sender does (`Retry-After`, else `X-RateLimit-Reset`, else 1 s·2ⁿ capped at 20 s).

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;

use crate::ship::lago::{body_text, wait_from_headers};

/// Transient failures (5xx, no answer, 429) tried this many times before the audit stops
/// (it resumes where it stopped on the next run).
const ATTEMPTS: u32 = 8;
/// Longest wait between attempts, as Lago's own clients cap it.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Longest answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// What Lago said about one id.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Found(Value),
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("Lago refused the API key (HTTP {status}): {body}; check LAGO_API_KEY")]
    Unauthorized { status: u16, body: String },
    #[error(
        "Lago kept failing on {what}: {last}; the check is tried again later (`tally audit` resumes where it stopped)"
    )]
    GaveUp { what: String, last: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

pub struct LagoReader {
    http: reqwest::Client,
    base: reqwest::Url,
    auth: HeaderValue,
    /// Time between requests (1 / rate).
    interval: Duration,
    next_at: Instant,
    /// 429 answers waited out, for the report.
    pub rate_limited: u64,
}

impl LagoReader {
    pub fn new(base: &reqwest::Url, api_key: &str, rate: f64) -> Result<Self, ReadError> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {api_key}")).map_err(|_| {
            ReadError::Build("LAGO_API_KEY cannot be used in an HTTP header".into())
        })?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ReadError::Build(e.to_string()))?;
        Ok(Self {
            http,
            base: base.clone(),
            auth,
            interval: Duration::from_secs_f64(1.0 / rate),
            next_at: Instant::now(),
            rate_limited: 0,
        })
    }

    pub async fn event(&mut self, transaction_id: &str) -> Result<Lookup, ReadError> {
        self.get(&["api", "v1", "events", transaction_id], "event")
            .await
    }

    pub async fn subscription(&mut self, external_id: &str) -> Result<Lookup, ReadError> {
        self.get(&["api", "v1", "subscriptions", external_id], "subscription")
            .await
    }

    /// `segments` are percent-encoded one by one, so an id with `/`, `?` or `#` stays one
    /// segment (Lago's "must be URL encoded").
    async fn get(&mut self, segments: &[&str], root: &str) -> Result<Lookup, ReadError> {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        let what = format!("GET {}", url.path());
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            tokio::time::sleep_until(self.next_at).await;
            self.next_at = Instant::now() + self.interval;
            let backoff = (Duration::from_secs(1) * 2u32.saturating_pow(attempt)).min(MAX_WAIT);
            let response = self
                .http
                .get(url.clone())
                .header(AUTHORIZATION, self.auth.clone())
                .send()
                .await;
            let mut response = match response {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let status = response.status();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            let mut too_long = false;
            let mut broken = None;
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        if body.len() + chunk.len() > MAX_ANSWER {
                            too_long = true;
                            break;
                        }
                        body.extend_from_slice(&chunk);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(e) = broken {
                last = e;
                tokio::time::sleep(backoff).await;
                continue;
            }
            match status {
                StatusCode::OK if !too_long => {
                    if let Some(object) = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|mut v| v.get_mut(root).map(Value::take))
                        .filter(Value::is_object)
                    {
                        return Ok(Lookup::Found(object));
                    }
                    last = format!("HTTP 200 without a {root:?} object: {}", body_text(&body));
                }
                StatusCode::NOT_FOUND => return Ok(Lookup::NotFound),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(ReadError::Unauthorized {
                        status: status.as_u16(),
                        body: body_text(&body),
                    });
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    self.rate_limited += 1;
                    let wait = wait_from_headers(&headers).unwrap_or(backoff).min(MAX_WAIT);
                    last = format!("HTTP 429, waited {wait:?}");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                other => last = format!("HTTP {}: {}", other.as_u16(), body_text(&body)),
            }
            tokio::time::sleep(backoff).await;
        }
        Err(ReadError::GaveUp { what, last })
    }
}
