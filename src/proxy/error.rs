//! The one error type of the proxy's HTTP surface, answered in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Client errors say what was wrong and how to fix it; internal failures are logged in full and
//! answered with a short message, so nothing internal (paths, keys) leaks to a client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

/// Everything a proxy handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No key, an unknown key, an expired or deleted key.
    #[error("{0}")]
    Unauthorized(String),
    /// A virtual key used on an admin route, or for a model it may not use.
    #[error("{message}")]
    Forbidden {
        message: String,
        param: Option<&'static str>,
    },
    /// A malformed or unsupported request body or query.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error(
        "request body is larger than the limit of {limit} bytes (tally_settings.max_body_bytes)"
    )]
    PayloadTooLarge { limit: usize },
    /// The body did not arrive within `body_read_timeout_secs`.
    #[error(
        "the request body did not arrive within {seconds}s (tally_settings.body_read_timeout_secs); send the whole body promptly"
    )]
    BodyTimeout { seconds: f64 },
    #[error("content type must be application/json, got {0:?}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The upstream could not be reached (connection refused, DNS, TLS, reset).
    #[error("upstream for model {model:?} is unreachable: {reason}")]
    UpstreamUnreachable { model: String, reason: String },
    /// The upstream did not answer within the deployment's `timeout`.
    #[error(
        "upstream for model {model:?} did not answer within {seconds}s (litellm_params.timeout)"
    )]
    UpstreamTimeout { model: String, seconds: f64 },
    /// The upstream answered with an error status: its body is passed through unchanged.
    #[error("upstream answered {status}")]
    Upstream {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// The spend log could not be written, so the request cannot be billed and is refused.
    #[error("the spend log is not writable; the request was not completed")]
    SpendLogUnavailable,
    /// The key database did not answer, so the key cannot be checked (503, retryable).
    #[error("{0}")]
    KeyStoreUnavailable(String),
    /// A bug or an environment failure (disk, SQLite). Logged, answered without detail.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: None,
            code: "invalid_request",
        }
    }

    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_request",
        }
    }

    /// A `model` this proxy does not serve, with the models it does.
    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        Self::BadRequest {
            message: format!(
                "model {model:?} is not served by this proxy; available models: {}",
                available.join(", ")
            ),
            param: Some("model".into()),
            code: "model_not_found",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream { status, .. } => *status,
            Self::SpendLogUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::KeyStoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::Unauthorized(_) => ("auth_error", "invalid_api_key"),
            Self::Forbidden { .. } => ("permission_error", "forbidden"),
            Self::BadRequest { code, .. } => ("invalid_request_error", code),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            Self::BodyTimeout { .. } => ("invalid_request_error", "request_timeout"),
            Self::UnsupportedMediaType(_) => ("invalid_request_error", "unsupported_media_type"),
            Self::NotFound(_) => ("not_found_error", "not_found"),
            Self::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            Self::UpstreamUnreachable { .. } => ("api_error", "upstream_unreachable"),
            Self::UpstreamTimeout { .. } => ("timeout_error", "upstream_timeout"),
            Self::Upstream { .. } => ("api_error", "upstream_error"),
            Self::SpendLogUnavailable => ("api_error", "spend_log_unavailable"),
            Self::KeyStoreUnavailable(_) => ("api_error", "key_store_unavailable"),
            Self::Internal(_) => ("api_error", "internal_error"),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::BadRequest { param, .. } => param.as_deref(),
            Self::Forbidden { param, .. } => *param,
            _ => None,
        }
    }
}

impl ProxyError {
    /// The error in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`, for
    /// the Messages API's routes. An upstream's own error body is passed through unchanged (an
    /// `anthropic/` upstream already answers in this shape).
    pub fn into_anthropic_response(self) -> Response {
        if matches!(self, Self::Upstream { .. }) {
            return self.into_response();
        }
        let status = self.status();
        let message = match &self {
            Self::Internal(detail) => {
                tracing::error!(error = %detail, "internal error while serving a request");
                "internal error; see the proxy's log".to_owned()
            }
            other => other.to_string(),
        };
        // Anthropic's error types (docs.anthropic.com, "Errors").
        let kind = match &self {
            Self::Unauthorized(_) => "authentication_error",
            Self::Forbidden { .. } => "permission_error",
            Self::NotFound(_) => "not_found_error",
            Self::PayloadTooLarge { .. } => "request_too_large",
            Self::BadRequest { .. }
            | Self::BodyTimeout { .. }
            | Self::UnsupportedMediaType(_)
            | Self::MethodNotAllowed => "invalid_request_error",
            Self::UpstreamTimeout { .. } => "timeout_error",
            Self::UpstreamUnreachable { .. }
            | Self::Upstream { .. }
            | Self::SpendLogUnavailable
            | Self::KeyStoreUnavailable(_)
            | Self::Internal(_) => "api_error",
        };
        let body = json!({"type": "error", "error": {"type": kind, "message": message}});
        (status, axum::Json(body)).into_response()
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        if let Self::Upstream {
            status,
            content_type,
            body,
        } = self
        {
            let mut response = (status, body).into_response();
            if let Some(ct) = content_type {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            return response;
        }
        let status = self.status();
        let message = match &self {
            Self::Internal(detail) => {
                tracing::error!(error = %detail, "internal error while serving a request");
                "internal error; see the proxy's log".to_owned()
            }
            other => other.to_string(),
        };
        let (kind, code) = self.kind();
        let body = json!({
            "error": {
                "message": message,
                "type": kind,
                "param": self.param(),
                "code": code,
            }
        });
        (status, axum::Json(body)).into_response()
    }
}
