//! Calls to OpenAI-compatible upstreams over one pooled HTTP client, with each deployment's
//! timeout (covering the whole answer, streamed or not), and the mapping of transport failures
//! to 502 / 504.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderValue, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_platform_verifier::BuilderVerifierExt;
use serde::Deserialize;
use tokio::time::Instant;

use super::config::Deployment;
use super::error::ProxyError;

/// How long establishing a connection (TCP and TLS) to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
///
/// A `hyper-util` pooled client (rustls with the platform's trust store for `https` upstreams)
/// rather than `reqwest`: reqwest re-parsed the URL twice per request and ran redirect and retry
/// layers the proxy never uses (upstream redirects are not followed either way), a tenth of a
/// proxied call's instructions.
#[derive(Clone)]
pub struct UpstreamClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for upstream calls: {0}")]
pub struct ClientError(#[from] rustls::Error);

/// A deployment's endpoint, prepared once at start-up.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    /// `url` parsed once (`Err` with the reason when it does not parse; the call then fails as
    /// unreachable, naming it).
    uri: Result<Uri, String>,
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
        let url = format!("{}{path}", d.api_base);
        Self {
            uri: url
                .parse::<Uri>()
                .map_err(|e| format!("invalid upstream URL: {e}")),
            url,
            auth,
            timeout: d.timeout,
        }
    }
}

/// A 2xx answer from the upstream, with the deadline its body must arrive by.
pub struct UpstreamResponse {
    response: hyper::Response<Incoming>,
    deadline: Instant,
}

impl UpstreamResponse {
    pub fn content_type(&self) -> Option<&HeaderValue> {
        self.response.headers().get(header::CONTENT_TYPE)
    }

    /// The body as it arrives, cut off with an error at the deadline.
    pub fn into_stream(self) -> BodyStream {
        BodyStream {
            body: self.response.into_body(),
            deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
            done: false,
        }
    }
}

/// Why a streamed body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the upstream did not finish its answer within the deployment's timeout")]
    TimedOut,
    #[error("reading the upstream's answer failed: {0}")]
    Read(#[from] hyper::Error),
}

/// An upstream answer's body as a stream of data chunks, bounded by the deployment's timeout.
pub struct BodyStream {
    body: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl futures::Stream for BodyStream {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry nothing the proxy forwards.
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(BodyError::Read(e))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        self.done = true;
                        return Poll::Ready(Some(Err(BodyError::TimedOut)));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl UpstreamClient {
    pub fn new() -> Result<Self, ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(tcp);
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(512)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self { http })
    }

    /// POSTs a JSON body. A 2xx answer is returned for the caller to read (whole or streamed)
    /// before the deployment's timeout; any other status becomes [`ProxyError::Upstream`]
    /// carrying the upstream's body unchanged.
    pub async fn post_json(
        &self,
        endpoint: &Endpoint,
        model_name: &str,
        body: Vec<u8>,
    ) -> Result<UpstreamResponse, ProxyError> {
        let unreachable = |reason: String| ProxyError::UpstreamUnreachable {
            model: model_name.to_owned(),
            reason,
        };
        let timed_out = || ProxyError::UpstreamTimeout {
            model: model_name.to_owned(),
            seconds: endpoint.timeout.as_secs_f64(),
        };
        let deadline = Instant::now() + endpoint.timeout;
        let uri = endpoint.uri.clone().map_err(unreachable)?;
        let mut request = hyper::Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        if let Some(auth) = &endpoint.auth {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        let response = tokio::time::timeout_at(deadline, self.http.request(request))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| unreachable(innermost(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(UpstreamResponse { response, deadline });
        }
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let body = tokio::time::timeout_at(deadline, response.into_body().collect())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| unreachable(innermost(&e)))?
            .to_bytes();
        Err(ProxyError::Upstream {
            status,
            content_type,
            body,
        })
    }

    /// Reads a whole (non-streamed) 2xx answer.
    pub async fn read_body(
        response: UpstreamResponse,
        endpoint: &Endpoint,
        model_name: &str,
    ) -> Result<(Option<HeaderValue>, Bytes), ProxyError> {
        let content_type = response.content_type().cloned();
        let body =
            tokio::time::timeout_at(response.deadline, response.response.into_body().collect())
                .await
                .map_err(|_| ProxyError::UpstreamTimeout {
                    model: model_name.to_owned(),
                    seconds: endpoint.timeout.as_secs_f64(),
                })?
                .map_err(|e| ProxyError::UpstreamUnreachable {
                    model: model_name.to_owned(),
                    reason: innermost(&e),
                })?
                .to_bytes();
        Ok((content_type, body))
    }
}

/// Only the innermost cause ("Connection refused") goes to the client: the outer layers may
/// repeat the upstream URL, which is the operator's business, not the client's.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = e;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    innermost.to_string()
}
