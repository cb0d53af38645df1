//! A relayed call's request, read and checked before anything is sent: the model (served here and
//! allowed to the caller's key), the end user it bills, `stream`, and the members its call type
//! needs. A refusal is a [`ProxyError`] answered to the client; nothing is forwarded or recorded
//! for it. The checks run in this order, so a request with several faults is told the first.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::{ANTHROPIC_BETA, ANTHROPIC_VERSION, CallType};
use crate::proxy::AppState;
use crate::proxy::auth::Caller;
use crate::proxy::end_user;
use crate::proxy::error::ProxyError;
use crate::proxy::json_body::{JsonBody, Kind};
use crate::proxy::limits;
use crate::proxy::observe;
use crate::proxy::provider;
use crate::proxy::router::Group;

/// What forwarding needs from the client's request, checked.
pub(super) struct CallRequest {
    /// The model the client asked for (recorded as `model`).
    pub model: String,
    /// The model group serving it, and the part of the name a wildcard matched.
    pub group: Arc<Group>,
    pub matched: Option<String>,
    /// Who the call bills: the request's `user` (or its call type's field), or a header.
    pub end_user_id: Option<String>,
    /// Whether the answer streams (never for call types that cannot).
    pub stream: bool,
    /// Client headers passed on (Anthropic's version and betas).
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    /// The body, relayed as the client sent it but for `model` (and `stream_options`).
    pub body: JsonBody,
}

/// Reads and checks `body` (and the headers naming the end user) for `caller`.
pub(super) fn request(
    state: &AppState,
    caller: &Caller,
    call_type: CallType,
    headers: &HeaderMap,
    body: JsonBody,
) -> Result<CallRequest, ProxyError> {
    let model = model_of(state, &body)?;
    observe::tag(&model, caller.key());
    let Some(target) = state.resolve(&model) else {
        return Err(ProxyError::model_not_found(&model, state.model_names()));
    };
    let group = target.group.clone();
    let matched = target.matched.map(str::to_owned);
    if let Some(key) = caller.key()
        && !key.allows_model(&model)
    {
        return Err(ProxyError::Forbidden {
            message: format!(
                "key {} may not use model {model:?}; it may use: {}",
                key.key_name,
                key.models.join(", ")
            ),
            param: Some("model"),
        });
    }
    let end_user_id = end_user_of(call_type, &body, headers)?;
    if let Some(key) = caller.key()
        && call_type != CallType::CountTokens
    {
        limits::require_billable_key(key)?;
        end_user::check_guard(key, end_user_id.as_deref())?;
    }
    let extra_headers = if call_type.anthropic() {
        anthropic_headers(headers)
    } else {
        Vec::new()
    };
    let stream = call_type.streams() && stream_of(&body)?;
    check_members(call_type, &body)?;
    Ok(CallRequest {
        model,
        group,
        matched,
        end_user_id,
        stream,
        extra_headers,
        body,
    })
}

/// `model`, a non-empty string.
fn model_of(state: &AppState, body: &JsonBody) -> Result<String, ProxyError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m),
        _ => Err(ProxyError::bad_param(
            "model",
            format!(
                "the request has no `model`; available models: {}",
                state.model_names().join(", ")
            ),
        )),
    }
}

/// The end user from the field each API names it in, or the headers.
fn end_user_of(
    call_type: CallType,
    body: &JsonBody,
    headers: &HeaderMap,
) -> Result<Option<String>, ProxyError> {
    match call_type {
        CallType::Chat | CallType::Embedding => end_user::of_request(body.get("user"), headers),
        CallType::Messages => end_user::of_request(
            body.get("metadata").and_then(|m| m.get("user_id").cloned()),
            headers,
        ),
        // Not billed: nobody to bill.
        CallType::CountTokens => Ok(None),
        CallType::Responses => end_user::of_request(
            body.get("user")
                .filter(|u| !u.is_null())
                .or_else(|| body.get("safety_identifier")),
            headers,
        ),
    }
}

/// `stream`: a boolean, or absent (`null` too) for no.
fn stream_of(body: &JsonBody) -> Result<bool, ProxyError> {
    match body.get("stream") {
        Some(Value::Bool(b)) => Ok(b),
        Some(Value::Null) | None => Ok(false),
        Some(_) => Err(ProxyError::bad_param(
            "stream",
            "`stream` must be a boolean",
        )),
    }
}

/// The members a call type cannot go without: chat `messages`, embedding `input`.
fn check_members(call_type: CallType, body: &JsonBody) -> Result<(), ProxyError> {
    if matches!(
        call_type,
        CallType::Chat | CallType::Messages | CallType::CountTokens
    ) && body.kind("messages") != Some(Kind::Array)
    {
        return Err(ProxyError::bad_param(
            "messages",
            "`messages` must be an array of chat messages",
        ));
    }
    if call_type == CallType::Embedding && matches!(body.kind("input"), None | Some(Kind::Null)) {
        return Err(ProxyError::bad_param("input", "`input` is required"));
    }
    Ok(())
}

/// The client's `anthropic-version` (or the default) and `anthropic-beta`, to pass on.
fn anthropic_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let version = headers
        .get(&ANTHROPIC_VERSION)
        .cloned()
        .unwrap_or(HeaderValue::from_static(
            provider::anthropic::DEFAULT_VERSION,
        ));
    let mut out = vec![(ANTHROPIC_VERSION, version)];
    for beta in headers.get_all(&ANTHROPIC_BETA) {
        out.push((ANTHROPIC_BETA, beta.clone()));
    }
    out
}
