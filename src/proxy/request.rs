//! Reading a request body as a JSON object, with the content-type check (415) and the size limit
//! (413) answered in OpenAI's error shape rather than axum's plain-text rejections.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};

use super::json_body::JsonBody;

use super::error::ProxyError;

/// The body as a JSON object. A missing content type is accepted (some clients omit it); any
/// other than `application/json` is refused.
pub async fn read_json_object(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Map<String, Value>, ProxyError> {
    let bytes = read_json_bytes(headers, body, limit).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ProxyError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ProxyError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// The body as a JSON object with its members located, for relaying (see [`JsonBody`]); the
/// same checks and refusals as [`read_json_object`].
pub async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<JsonBody, ProxyError> {
    JsonBody::parse(read_json_bytes(headers, body, limit).await?)
}

/// The raw body, after the content-type check and within the size limit.
async fn read_json_bytes(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ProxyError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let text = ct.to_str().unwrap_or_default();
        let essence = text.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ProxyError::UnsupportedMediaType(text.to_owned()));
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ProxyError::PayloadTooLarge { limit })
        }
        Err(e) => Err(ProxyError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}
