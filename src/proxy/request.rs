//! Reading a request body as a JSON object, with the content-type check (415) and the size limit
//! (413) answered in OpenAI's error shape rather than axum's plain-text rejections.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Map, Value};

use super::json_body::JsonBody;

use super::error::ProxyError;
use super::server::BodyTimeout;

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
            return Err(refuse(body, ProxyError::UnsupportedMediaType(text.to_owned())).await);
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(refuse(body, ProxyError::PayloadTooLarge { limit }).await);
    }
    let mut body = body;
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e = e.into_inner();
            match e.downcast_ref::<BodyTimeout>() {
                Some(t) => ProxyError::BodyTimeout {
                    seconds: t.limit.as_secs_f64(),
                },
                None => ProxyError::bad_request(format!("could not read the request body: {e}")),
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        len += data.len();
        if len > limit {
            return Err(refuse(body, ProxyError::PayloadTooLarge { limit }).await);
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Most of a refused body read (and dropped) before answering, so the answer reaches the client.
const DRAIN_MAX_BYTES: usize = 16 << 20;
/// Longest time spent reading a refused body.
const DRAIN_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads the rest of a refused body and throws it away, then gives back `error`. A server that
/// answers and closes while the client is still sending makes the kernel reset the connection,
/// which can destroy the answer before the client reads it: the client sees a broken connection
/// instead of the 413 or 415. Bodies past the bounds are left unread (the connection closes).
async fn refuse(mut body: Body, error: ProxyError) -> ProxyError {
    let drain = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > DRAIN_MAX_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, drain).await;
    error
}
