//! Calls to OpenAI-compatible upstreams over one pooled HTTP client, with each deployment's
//! timeout, and the mapping of transport failures to 502 / 504.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use bytes::Bytes;
use serde::Deserialize;

use super::config::Deployment;
use super::error::ProxyError;

/// Token usage as OpenAI reports it (`usage` of a response or of the last stream chunk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: Option<u64>,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: Some(prompt_tokens + completion_tokens),
        }
    }
}

/// The one HTTP client every upstream call shares, so connections are pooled and reused.
#[derive(Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
}

/// A deployment's endpoint, prepared once at start-up.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub auth: Option<HeaderValue>,
    pub timeout: Duration,
}

impl Endpoint {
    pub fn new(d: &Deployment, path: &str) -> Self {
        let auth = d.api_key.as_ref().and_then(|k| {
            let mut v = HeaderValue::from_str(&format!("Bearer {k}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Self {
            url: format!("{}{path}", d.api_base),
            auth,
            timeout: d.timeout,
        }
    }
}

impl UpstreamClient {
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self { http })
    }

    /// POSTs a JSON body. A 2xx answer is returned for the caller to read (whole or streamed);
    /// any other status becomes [`ProxyError::Upstream`] carrying the upstream's body unchanged.
    pub async fn post_json(
        &self,
        endpoint: &Endpoint,
        model_name: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, ProxyError> {
        let mut request = self
            .http
            .post(&endpoint.url)
            .timeout(endpoint.timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(auth) = &endpoint.auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(e, model_name, endpoint.timeout))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(e, model_name, endpoint.timeout))?;
        Err(ProxyError::Upstream {
            status: StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            content_type,
            body,
        })
    }

    /// Reads a whole (non-streamed) 2xx answer.
    pub async fn read_body(
        response: reqwest::Response,
        endpoint: &Endpoint,
        model_name: &str,
    ) -> Result<(Option<HeaderValue>, Bytes), ProxyError> {
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(e, model_name, endpoint.timeout))?;
        Ok((content_type, body))
    }
}

/// Timeouts are 504; everything else that kept an answer from arriving (refused, reset, DNS,
/// TLS, a body cut short) is 502.
pub fn transport_error(e: reqwest::Error, model_name: &str, timeout: Duration) -> ProxyError {
    if e.is_timeout() {
        ProxyError::UpstreamTimeout {
            model: model_name.to_owned(),
            seconds: timeout.as_secs_f64(),
        }
    } else {
        // Only the innermost cause ("Connection refused") goes to the client: the outer
        // layers repeat the upstream URL, which is the operator's business, not the client's.
        let mut innermost: &dyn std::error::Error = &e;
        while let Some(source) = innermost.source() {
            innermost = source;
        }
        let reason = innermost.to_string();
        ProxyError::UpstreamUnreachable {
            model: model_name.to_owned(),
            reason,
        }
    }
}
