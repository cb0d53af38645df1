//! Calls to OpenAI-compatible upstreams over kept-alive HTTP/1.1 connections ([`conn`]), with
//! each deployment's timeout (covering the whole answer, streamed or not), and the mapping of
//! transport failures to 502 / 504.

mod conn;
mod wake_gate;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_platform_verifier::BuilderVerifierExt;
use tokio::time::Instant;

use self::conn::{Conn, Connector, Driven, IdleConns, SendError, UpstreamRequest};
use super::config::Deployment;
use super::error::ProxyError;
use super::provider::{self, CallKind};

/// How long establishing a connection (TCP and TLS) to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub use super::usage::Usage;

/// What every upstream call shares: how to open a connection (TCP, and rustls with the
/// platform's trust store for `https` upstreams). The kept-alive connections live with their
/// [`Endpoint`].
///
/// Not a pooled client (`reqwest`, hyper-util's): those parse URLs per request, run layers the
/// proxy never uses, and hand every request to a connection task over channels; see [`conn`].
#[derive(Clone)]
pub struct UpstreamClient {
    connector: Connector,
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for upstream calls: {0}")]
pub struct ClientError(#[from] rustls::Error);

/// A deployment's endpoint, prepared once at start-up, with its idle connections.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    /// Where and what to send (`Err` with the reason when `url` is not a usable http(s) URL;
    /// the call then fails as unreachable, naming it).
    target: Result<Target, String>,
    /// The auth header the provider sends (`Authorization`, or Azure's `api-key`).
    pub auth: Option<(HeaderName, HeaderValue)>,
    pub timeout: Duration,
    idle: Arc<IdleConns>,
}

/// `url` taken apart once: the origin to connect to, and the request line's path and `Host`.
#[derive(Debug, Clone)]
struct Target {
    origin: Uri,
    path: Uri,
    host: HeaderValue,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let invalid = |reason: &dyn std::fmt::Display| format!("invalid upstream URL: {reason}");
        let uri = url.parse::<Uri>().map_err(|e| invalid(&e))?;
        let secure = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid(&"the scheme must be http or https")),
        };
        let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
            return Err(invalid(&"it has no host"));
        };
        // `Host` as a browser would send it: no user info, the port only when not the default.
        let host = match uri.port_u16() {
            Some(port) if port != if secure { 443 } else { 80 } => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        Ok(Self {
            origin: Uri::builder()
                .scheme(uri.scheme_str().unwrap_or("http"))
                .authority(authority.as_str())
                .path_and_query("/")
                .build()
                .map_err(|e| invalid(&e))?,
            path: uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()
                .map_err(|e| invalid(&e))?,
            host: HeaderValue::from_str(&host).map_err(|e| invalid(&e))?,
        })
    }
}

impl Endpoint {
    /// The endpoint of `call` on deployment `d`: URL and auth header as its provider has them.
    pub fn new(d: &Deployment, call: CallKind) -> Self {
        let provider = provider::of(d);
        let auth = provider
            .auth(d)
            .and_then(|(name, value)| Some((name, provider::header_value(&value)?)));
        let url = provider.url(d, call);
        Self {
            target: Target::parse(&url),
            url,
            auth,
            timeout: d.timeout,
            idle: Arc::default(),
        }
    }

    /// The same endpoint at another URL of the same origin (a wildcard Azure deployment's
    /// per-model path): its auth and timeout, sharing its kept-alive connections.
    pub fn with_url(&self, url: String) -> Self {
        Self {
            target: Target::parse(&url),
            url,
            auth: self.auth.clone(),
            timeout: self.timeout,
            idle: self.idle.clone(),
        }
    }

    fn request(
        &self,
        target: &Target,
        method: hyper::Method,
        body: Option<Bytes>,
        extra: &[(HeaderName, HeaderValue)],
    ) -> UpstreamRequest {
        let has_body = body.is_some();
        let mut request = hyper::Request::new(Full::new(body.unwrap_or_default()));
        *request.method_mut() = method;
        *request.uri_mut() = target.path.clone();
        let headers = request.headers_mut();
        headers.insert(header::HOST, target.host.clone());
        if has_body {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        for (name, value) in extra {
            headers.insert(name.clone(), value.clone());
        }
        if let Some((name, value)) = &self.auth {
            headers.insert(name.clone(), value.clone());
        }
        request
    }
}

/// A 2xx answer from the upstream, with the connection its body arrives on and the deadline it
/// must arrive by.
pub struct UpstreamResponse {
    content_type: Option<HeaderValue>,
    body: Driven,
    deadline: Instant,
}

impl UpstreamResponse {
    pub fn content_type(&self) -> Option<&HeaderValue> {
        self.content_type.as_ref()
    }

    /// The body as it arrives, cut off with an error at the deadline.
    pub fn into_stream(self) -> BodyStream {
        BodyStream {
            body: self.body,
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
    body: Driven,
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
            .enable_http1()
            .wrap_connector(tcp);
        Ok(Self { connector })
    }

    /// POSTs a JSON body. A 2xx answer is returned for the caller to read (whole or streamed)
    /// before the deployment's timeout; any other status becomes [`ProxyError::Upstream`]
    /// carrying the upstream's body unchanged. `extra` are headers of the client's passed on
    /// (Anthropic's `anthropic-version`); the provider's auth header wins over them.
    pub async fn post_json(
        &self,
        endpoint: &Endpoint,
        model_name: &str,
        body: Vec<u8>,
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<UpstreamResponse, ProxyError> {
        self.call(endpoint, hyper::Method::POST, model_name, Some(body), extra)
            .await
    }

    /// [`UpstreamClient::post_json`] with any method, and no body for `None` (`GET`/`DELETE`
    /// of a stored response).
    pub async fn call(
        &self,
        endpoint: &Endpoint,
        method: hyper::Method,
        model_name: &str,
        body: Option<Vec<u8>>,
        extra: &[(HeaderName, HeaderValue)],
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
        let target = endpoint
            .target
            .as_ref()
            .map_err(|e| unreachable(e.clone()))?;
        let request = endpoint.request(target, method, body.map(Bytes::from), extra);
        let (conn, response) =
            tokio::time::timeout_at(deadline, self.exchange(endpoint, target, request))
                .await
                .map_err(|_| timed_out())?
                .map_err(unreachable)?;
        let (head, body) = response.into_parts();
        let body = Driven::new(body, conn, endpoint.idle.clone());
        if head.status.is_success() {
            return Ok(UpstreamResponse {
                content_type: head.headers.get(header::CONTENT_TYPE).cloned(),
                body,
                deadline,
            });
        }
        let body = tokio::time::timeout_at(deadline, body.collect())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| unreachable(innermost(&e)))?
            .to_bytes();
        Err(ProxyError::Upstream {
            status: head.status,
            content_type: head.headers.get(header::CONTENT_TYPE).cloned(),
            body,
        })
    }

    /// Sends `request` on a kept connection, or a new one; returns the connection with the
    /// answer's head. A kept connection the upstream closed before it took the request is
    /// dropped and the request sent on the next one; a request that may have reached the
    /// upstream is never sent twice.
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        target: &Target,
        mut request: UpstreamRequest,
    ) -> Result<(Conn, hyper::Response<Incoming>), String> {
        while let Some(mut conn) = endpoint.idle.take() {
            match conn.send(request).await {
                Ok(response) => return Ok((conn, response)),
                Err(SendError::NotSent(unsent, _)) => request = *unsent,
                Err(SendError::Failed(e)) => return Err(innermost(&e)),
            }
        }
        // Boxed: a new connection is rare (they are kept alive), and its handshake's state would
        // otherwise enlarge every call's future, which is moved whole onto the heap per request.
        let mut conn = Box::pin(Conn::open(&self.connector, &target.origin))
            .await
            .map_err(|e| innermost(&*e))?;
        match conn.send(request).await {
            Ok(response) => Ok((conn, response)),
            Err(SendError::NotSent(_, e) | SendError::Failed(e)) => Err(innermost(&e)),
        }
    }

    /// Reads a whole (non-streamed) 2xx answer.
    pub async fn read_body(
        response: UpstreamResponse,
        endpoint: &Endpoint,
        model_name: &str,
    ) -> Result<(Option<HeaderValue>, Bytes), ProxyError> {
        let body = tokio::time::timeout_at(response.deadline, response.body.collect())
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
        Ok((response.content_type, body))
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
