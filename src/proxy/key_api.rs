//! The virtual-key API, with LiteLLM's routes, field names and response shapes: `/key/generate`,
//! `/key/info`, `/key/delete`, `/key/update`, `/key/regenerate` (and `/key/{key}/regenerate`),
//! `/key/list`, `/key/block`, `/key/unblock`. Master key only.
//!
//! LiteLLM fields that tally does not enforce (budgets, rate limits, …) are refused with a 400
//! naming the field: a client that set a budget must not believe it is enforced.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::auth::store_error;
use super::end_user;
use super::error::ProxyError;
use super::keys::{KeyHash, KeyRecord, NewKey, hash_key, key_name, new_key, parse_duration};
use super::keystore::{KeyStoreError, ListFilter};
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
    "aliases",
    "config",
    "tags",
    "enforced_params",
    "send_invite_email",
    "organization_id",
    "allowed_routes",
    "key_type",
];

/// `/key/list`'s largest page (LiteLLM's bound too).
const MAX_PAGE_SIZE: u64 = 100;

/// Which route a body is for: decides what `key` means and which fields are accepted.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    Generate,
    Update,
    Regenerate,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Self::Generate => "/key/generate",
            Self::Update => "/key/update",
            Self::Regenerate => "/key/regenerate",
        }
    }
}

/// A validated body: `None` = not sent (unchanged on update).
#[derive(Default)]
struct Fields {
    key: Option<String>,
    new_key: Option<String>,
    key_alias: Option<Option<String>>,
    user_id: Option<Option<String>>,
    team_id: Option<Option<String>>,
    models: Option<Vec<String>>,
    metadata: Option<Map<String, Value>>,
    expires: Option<DateTime<Utc>>,
    blocked: Option<bool>,
}

impl Fields {
    fn apply(self, record: &mut KeyRecord) {
        if let Some(v) = self.key_alias {
            record.key_alias = v;
        }
        if let Some(v) = self.user_id {
            record.user_id = v;
        }
        if let Some(v) = self.team_id {
            record.team_id = v;
        }
        if let Some(v) = self.models {
            record.models = v;
        }
        if let Some(v) = self.metadata {
            record.metadata = v;
        }
        if let Some(v) = self.expires {
            record.expires = Some(super::keys::to_millis(v));
        }
        if let Some(v) = self.blocked {
            record.blocked = v;
        }
    }
}

async fn body_of(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, ProxyError> {
    read_json_object(headers, body, state.max_body_bytes()).await
}

pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers).await?;
    let fields = parse_fields(body_of(&state, &headers, body).await?, Route::Generate)?;
    let key = fields.key.clone().unwrap_or_else(new_key);
    let mut record = KeyRecord::new(&key, NewKey::default());
    fields.apply(&mut record);
    match state.auth().keys().insert(record.clone()).await {
        Ok(()) => {}
        Err(KeyStoreError::Exists) => {
            return Err(ProxyError::bad_param(
                "key",
                "a key with this value already exists; choose another `key` or leave it out for a random one",
            ));
        }
        Err(e) => return Err(store_error(e)),
    }
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
    state.auth().require_master(&headers).await?;
    let Some(key) = query.key.filter(|k| !k.is_empty()) else {
        return Err(ProxyError::bad_param(
            "key",
            "pass the key or its token (SHA-256 hex) as ?key=",
        ));
    };
    let record = existing(&state, &key).await?;
    let info = describe(&record);
    Ok(Json(json!({"key": record.token(), "info": info})).into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers).await?;
    let mut body = body_of(&state, &headers, body).await?;
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
        if find(&state, hash).await?.is_none() {
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
    let deleted = state
        .auth()
        .keys()
        .delete(&hashes)
        .await
        .map_err(store_error)?;
    let deleted: Vec<String> = deleted.iter().map(hex::encode).collect();
    Ok(Json(json!({"deleted_keys": deleted})).into_response())
}

/// `/key/update`: changes the fields sent, keeps the rest.
pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers).await?;
    let mut fields = parse_fields(body_of(&state, &headers, body).await?, Route::Update)?;
    let key = fields.key.take().ok_or_else(|| {
        ProxyError::bad_param("key", "send the key (or its token) to update as `key`")
    })?;
    let mut record = (*existing(&state, &key).await?).clone();
    fields.apply(&mut record);
    if !state
        .auth()
        .keys()
        .update(record.clone())
        .await
        .map_err(store_error)?
    {
        return Err(gone());
    }
    let mut body = describe(&record);
    body.insert("key".into(), Value::String(key));
    Ok(Json(Value::Object(body)).into_response())
}

/// `/key/regenerate` (`{"key": ...}`) and `/key/{key}/regenerate`: a new key with the old one's
/// settings (and any changed in the body); the old key stops working at once.
pub async fn regenerate(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Option<Path<String>>,
    body: Body,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers).await?;
    let raw = if headers.contains_key(axum::http::header::CONTENT_TYPE) {
        body_of(&state, &headers, body).await?
    } else {
        Map::new()
    };
    let mut fields = parse_fields(raw, Route::Regenerate)?;
    let key = match (path.map(|Path(k)| k), fields.key.take()) {
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => {
            return Err(ProxyError::bad_param(
                "key",
                "send the key (or its token) to regenerate as `key`, or call /key/{key}/regenerate",
            ));
        }
    };
    let old = existing(&state, &key).await?;
    let fresh = fields.new_key.take().unwrap_or_else(new_key);
    let mut record = (*old).clone();
    record.hash = hash_key(&fresh);
    record.key_name = key_name(&fresh);
    fields.apply(&mut record);
    match state.auth().keys().replace(old.hash, record.clone()).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(ProxyError::bad_param(
                "new_key",
                "the key no longer exists or `new_key` is already taken; nothing was changed",
            ));
        }
        Err(e) => return Err(store_error(e)),
    }
    let mut body = describe(&record);
    body.insert("key".into(), Value::String(fresh));
    Ok(Json(Value::Object(body)).into_response())
}

#[derive(Deserialize)]
pub struct ListQuery {
    page: Option<u64>,
    size: Option<u64>,
    user_id: Option<String>,
    team_id: Option<String>,
    key_alias: Option<String>,
    return_full_object: Option<bool>,
}

/// `/key/list`: LiteLLM's pagination (`page` from 1, `size` up to 100); tokens, or full objects
/// with `return_full_object=true`.
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers).await?;
    let page = q.page.unwrap_or(1);
    if page == 0 {
        return Err(ProxyError::bad_param("page", "`page` counts from 1"));
    }
    let size = q.size.unwrap_or(10);
    if !(1..=MAX_PAGE_SIZE).contains(&size) {
        return Err(ProxyError::bad_param(
            "size",
            format!("`size` must be 1 to {MAX_PAGE_SIZE}"),
        ));
    }
    let filter = ListFilter {
        user_id: q.user_id,
        team_id: q.team_id,
        key_alias: q.key_alias,
    };
    let result = state
        .auth()
        .keys()
        .list(filter, (page - 1).saturating_mul(size), size)
        .await
        .map_err(store_error)?;
    let keys: Vec<Value> = result
        .keys
        .iter()
        .map(|r| {
            if q.return_full_object == Some(true) {
                Value::Object(describe(r))
            } else {
                Value::String(r.token())
            }
        })
        .collect();
    Ok(Json(json!({
        "keys": keys,
        "total_count": result.total,
        "current_page": page,
        "total_pages": result.total.div_ceil(size),
    }))
    .into_response())
}

pub async fn block(
    state: State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    set_blocked(state, headers, body, true).await
}

pub async fn unblock(
    state: State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    set_blocked(state, headers, body, false).await
}

/// `/key/block` and `/key/unblock` (`{"key": ...}`): answers with the key's record.
async fn set_blocked(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
    blocked: bool,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers).await?;
    let mut body = body_of(&state, &headers, body).await?;
    let Some(Value::String(key)) = body.remove("key") else {
        return Err(ProxyError::bad_param(
            "key",
            "send {\"key\": \"sk-...\"} (the key or its token)",
        ));
    };
    if let Some(field) = body.keys().next() {
        return Err(ProxyError::bad_param(
            field.clone(),
            format!("unknown field `{field}`; only `key` is accepted"),
        ));
    }
    let mut record = (*existing(&state, &key).await?).clone();
    record.blocked = blocked;
    if !state
        .auth()
        .keys()
        .update(record.clone())
        .await
        .map_err(store_error)?
    {
        return Err(gone());
    }
    Ok(Json(Value::Object(describe(&record))).into_response())
}

fn gone() -> ProxyError {
    ProxyError::NotFound("no such key (unknown, or deleted)".into())
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

async fn find(state: &AppState, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, ProxyError> {
    state.auth().keys().find(hash).await.map_err(store_error)
}

async fn existing(state: &AppState, key: &str) -> Result<Arc<KeyRecord>, ProxyError> {
    find(state, &identify(key)).await?.ok_or_else(gone)
}

/// A key's public description (LiteLLM's response fields), never the key itself.
pub fn describe(record: &KeyRecord) -> Map<String, Value> {
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
    map.insert("blocked".into(), json!(record.blocked));
    map
}

/// A caller-chosen key: LiteLLM's `sk-` form, bounded, printable.
fn check_chosen_key(field: &str, key: &str) -> Result<(), ProxyError> {
    if !key.starts_with("sk-")
        || key.len() < 8
        || key.len() > 256
        || key.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ProxyError::bad_param(
            field,
            format!(
                "`{field}` must start with `sk-` and be 8 to 256 characters without spaces (LiteLLM's key form)"
            ),
        ));
    }
    Ok(())
}

/// Validates a key body field by field (the same bounds for every route).
fn parse_fields(body: Map<String, Value>, route: Route) -> Result<Fields, ProxyError> {
    let mut new = Fields::default();
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
            "key_alias" => new.key_alias = Some(optional_id(value)?),
            "user_id" => new.user_id = Some(optional_id(value)?),
            "team_id" => new.team_id = Some(optional_id(value)?),
            "key" => {
                let Some(key) = optional_string(value)? else {
                    continue;
                };
                if route == Route::Generate {
                    check_chosen_key("key", &key)?;
                }
                new.key = Some(key);
            }
            "new_key" if route == Route::Regenerate => {
                if let Some(key) = optional_string(value)? {
                    check_chosen_key("new_key", &key)?;
                    new.new_key = Some(key);
                }
            }
            "blocked" if route != Route::Regenerate => match value {
                Value::Null => {}
                Value::Bool(b) => new.blocked = Some(b),
                _ => {
                    return Err(ProxyError::bad_param(
                        "blocked",
                        "`blocked` must be true or false",
                    ));
                }
            },
            "models" => {
                let models: Vec<String> = match value {
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
                limits::require_models(&models)?;
                new.models = Some(models);
            }
            "metadata" => {
                let metadata = match value {
                    Value::Null => Map::new(),
                    Value::Object(m) => m,
                    _ => {
                        return Err(ProxyError::bad_param(
                            "metadata",
                            "`metadata` must be a JSON object",
                        ));
                    }
                };
                limits::require_metadata(&metadata)?;
                end_user::validate_guard(&metadata)?;
                new.metadata = Some(metadata);
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
                        "unknown field `{other}` for {}; accepted: key, key_alias, user_id, team_id, models, metadata, duration, blocked{}",
                        route.path(),
                        if route == Route::Regenerate {
                            ", new_key"
                        } else {
                            ""
                        }
                    ),
                    param: Some(other.to_owned()),
                    code: "unknown_field",
                });
            }
        }
    }
    Ok(new)
}
