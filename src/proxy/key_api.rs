//! The virtual-key API, with LiteLLM's field names: `/key/generate`, `/key/info`, `/key/delete`.
//! Master key only.
//!
//! LiteLLM fields that tally does not enforce (budgets, rate limits, …) are refused with a 400
//! naming the field: a client that set a budget must not believe it is enforced.

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::end_user;
use super::error::ProxyError;
use super::keys::{KeyHash, KeyRecord, NewKey, hash_key, parse_duration};
use super::limits;
use super::request::read_json_object;

/// LiteLLM `/key/generate` fields tally knows but does not enforce.
const NOT_ENFORCED: &[&str] = &[
    "max_budget",
    "budget_duration",
    "soft_budget",
    "spend",
    "tpm_limit",
    "rpm_limit",
    "max_parallel_requests",
    "model_max_budget",
    "model_rpm_limit",
    "model_tpm_limit",
    "budget_id",
    "allowed_cache_controls",
    "permissions",
    "guardrails",
    "blocked",
    "aliases",
    "config",
    "tags",
    "enforced_params",
    "key",
    "send_invite_email",
    "organization_id",
    "allowed_routes",
    "key_type",
];

pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers)?;
    let body = read_json_object(&headers, body, state.max_body_bytes()).await?;
    let new = parse_generate(body)?;
    let keys = state.auth().keys().clone();
    let (key, record) = tokio::task::spawn_blocking(move || keys.generate(new))
        .await
        .map_err(|e| ProxyError::Internal(format!("key generation task: {e}")))?
        .map_err(|e| ProxyError::Internal(e.to_string()))?;
    let mut body = describe(&record);
    body.insert("key".into(), Value::String(key));
    Ok((StatusCode::OK, Json(Value::Object(body))).into_response())
}

#[derive(Deserialize)]
pub struct InfoQuery {
    key: Option<String>,
}

pub async fn info(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<InfoQuery>,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers)?;
    let Some(key) = query.key.filter(|k| !k.is_empty()) else {
        return Err(ProxyError::bad_param(
            "key",
            "pass the key or its token (SHA-256 hex) as ?key=",
        ));
    };
    let record = find(&state, &identify(&key))?
        .ok_or_else(|| ProxyError::NotFound("no such key (unknown, or deleted)".into()))?;
    let info = describe(&record);
    Ok(Json(json!({"key": record.token(), "info": info})).into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers)?;
    let mut body = read_json_object(&headers, body, state.max_body_bytes()).await?;
    let keys = match body.remove("keys") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => {
            return Err(ProxyError::bad_param(
                "keys",
                "send {\"keys\": [...]} with keys or their tokens (SHA-256 hex)",
            ));
        }
    };
    if let Some(field) = body.keys().next() {
        return Err(ProxyError::bad_param(
            field.clone(),
            format!("unknown field `{field}` for /key/delete; only `keys` is accepted"),
        ));
    }
    let mut hashes = Vec::with_capacity(keys.len());
    for item in &keys {
        let Value::String(k) = item else {
            return Err(ProxyError::bad_param(
                "keys",
                "every entry of `keys` must be a string",
            ));
        };
        hashes.push(identify(k));
    }
    let mut missing = Vec::new();
    for hash in &hashes {
        if find(&state, hash)?.is_none() {
            missing.push(hex::encode(hash));
        }
    }
    if !missing.is_empty() {
        return Err(ProxyError::NotFound(format!(
            "{} of the keys do not exist (tokens {}); nothing was deleted",
            missing.len(),
            missing.join(", ")
        )));
    }
    let store = state.auth().keys().clone();
    let deleted = tokio::task::spawn_blocking(move || store.delete(&hashes))
        .await
        .map_err(|e| ProxyError::Internal(format!("key deletion task: {e}")))?
        .map_err(|e| ProxyError::Internal(e.to_string()))?;
    let deleted: Vec<String> = deleted.iter().map(hex::encode).collect();
    Ok(Json(json!({"deleted_keys": deleted})).into_response())
}

/// A key (`sk-...`) or its token (64 hex digits) → the hash.
fn identify(key_or_token: &str) -> KeyHash {
    let mut hash = [0u8; 32];
    if key_or_token.len() == 64 && hex::decode_to_slice(key_or_token, &mut hash).is_ok() {
        hash
    } else {
        hash_key(key_or_token)
    }
}

fn find(state: &AppState, hash: &KeyHash) -> Result<Option<std::sync::Arc<KeyRecord>>, ProxyError> {
    state
        .auth()
        .keys()
        .find(hash)
        .map_err(|e| ProxyError::Internal(e.to_string()))
}

/// A key's public description (LiteLLM's response fields), never the key itself.
fn describe(record: &KeyRecord) -> Map<String, Value> {
    let fmt = crate::spend::fmt_millis;
    let mut map = Map::new();
    map.insert("key_name".into(), json!(record.key_name));
    map.insert("token".into(), json!(record.token()));
    map.insert("key_alias".into(), json!(record.key_alias));
    map.insert("user_id".into(), json!(record.user_id));
    map.insert("team_id".into(), json!(record.team_id));
    map.insert("models".into(), json!(record.models));
    map.insert("metadata".into(), Value::Object(record.metadata.clone()));
    map.insert("expires".into(), json!(record.expires.as_ref().map(fmt)));
    map.insert("created_at".into(), json!(fmt(&record.created_at)));
    map
}

/// Validates a `/key/generate` body field by field.
fn parse_generate(body: Map<String, Value>) -> Result<NewKey, ProxyError> {
    let mut new = NewKey::default();
    for (field, value) in body {
        let optional_string = |value: Value| match value {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            _ => Err(ProxyError::bad_param(
                field.clone(),
                format!("`{field}` must be a string"),
            )),
        };
        let optional_id = |value: Value| {
            let id = optional_string(value)?;
            if let Some(id) = &id {
                limits::require_id(&field, id)?;
            }
            Ok::<_, ProxyError>(id)
        };
        match field.as_str() {
            "key_alias" => new.key_alias = optional_id(value)?,
            "user_id" => new.user_id = optional_id(value)?,
            "team_id" => new.team_id = optional_id(value)?,
            "models" => {
                new.models = match value {
                    Value::Null => Vec::new(),
                    Value::Array(items) => items
                        .into_iter()
                        .map(|m| match m {
                            Value::String(s) => Ok(s),
                            _ => Err(ProxyError::bad_param(
                                "models",
                                "`models` must be a list of model names",
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => {
                        return Err(ProxyError::bad_param(
                            "models",
                            "`models` must be a list of model names",
                        ));
                    }
                };
                limits::require_models(&new.models)?;
            }
            "metadata" => {
                new.metadata = match value {
                    Value::Null => Map::new(),
                    Value::Object(m) => m,
                    _ => {
                        return Err(ProxyError::bad_param(
                            "metadata",
                            "`metadata` must be a JSON object",
                        ));
                    }
                };
                limits::require_metadata(&new.metadata)?;
                end_user::validate_guard(&new.metadata)?;
            }
            "duration" => {
                if let Some(text) = optional_string(value)? {
                    let duration = parse_duration(&text).ok_or_else(|| {
                        ProxyError::bad_param(
                            "duration",
                            format!(
                                "`duration` {text:?} is not a duration; write a number and a unit: \"30s\", \"10m\", \"2h\", \"7d\""
                            ),
                        )
                    })?;
                    // "0s" would mint a key that is already expired.
                    if duration <= chrono::Duration::zero() {
                        return Err(ProxyError::bad_param(
                            "duration",
                            format!(
                                "`duration` {text:?} is not positive: the key would be expired when created; write e.g. \"30s\", \"7d\", or leave it out for a key that does not expire"
                            ),
                        ));
                    }
                    new.expires = Some(Utc::now() + duration);
                }
            }
            f if NOT_ENFORCED.contains(&f) => {
                // LiteLLM clients often send unset options as null; only a value is refused.
                if !value.is_null() {
                    return Err(ProxyError::BadRequest {
                        message: format!(
                            "`{f}` is not supported: tally does not enforce budgets, rate limits or key policies, \
                             so it refuses them rather than ignore them; remove `{f}` from the request"
                        ),
                        param: Some(f.to_owned()),
                        code: "unsupported_field",
                    });
                }
            }
            other => {
                return Err(ProxyError::BadRequest {
                    message: format!(
                        "unknown field `{other}` for /key/generate; accepted: key_alias, user_id, team_id, models, metadata, duration"
                    ),
                    param: Some(other.to_owned()),
                    code: "unknown_field",
                });
            }
        }
    }
    Ok(new)
}
