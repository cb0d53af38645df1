//! The router: which path goes to which handler, plus the small handlers (health, models).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::AppState;
use super::error::ProxyError;
use super::{key_api, observe, relay, stored_responses};

/// The whole HTTP surface, ready to serve (tests call it directly).
pub fn app(state: AppState) -> Router {
    // Relayed calls are counted for Prometheus by the handlers themselves (observe::track); the
    // other routes are not.
    Router::new()
        .route("/chat/completions", post(relay::chat_completions))
        .route("/v1/chat/completions", post(relay::chat_completions))
        .route("/embeddings", post(relay::embeddings))
        .route("/v1/embeddings", post(relay::embeddings))
        .route("/messages", post(relay::messages))
        .route("/v1/messages", post(relay::messages))
        .route("/messages/count_tokens", post(relay::count_tokens))
        .route("/v1/messages/count_tokens", post(relay::count_tokens))
        .route("/responses", post(relay::responses))
        .route("/v1/responses", post(relay::responses))
        .route(
            "/responses/{id}",
            get(stored_responses::get_or_delete).delete(stored_responses::get_or_delete),
        )
        .route(
            "/v1/responses/{id}",
            get(stored_responses::get_or_delete).delete(stored_responses::get_or_delete),
        )
        .route("/metrics", get(observe::metrics))
        .route("/models", get(models))
        .route("/v1/models", get(models))
        .route("/health/liveliness", get(liveness))
        .route("/health/liveness", get(liveness))
        .route("/health/readiness", get(readiness))
        .route("/key/generate", post(key_api::generate))
        .route("/key/info", get(key_api::info))
        .route("/key/delete", post(key_api::delete))
        .route("/key/update", post(key_api::update))
        .route("/key/regenerate", post(key_api::regenerate))
        .route("/key/{key}/regenerate", post(key_api::regenerate))
        .route("/key/list", get(key_api::list))
        .route("/key/block", post(key_api::block))
        .route("/key/unblock", post(key_api::unblock))
        .fallback(not_found)
        .method_not_allowed_fallback(async || ProxyError::MethodNotAllowed)
        .with_state(state)
}

/// No auth: says only that the process answers.
async fn liveness() -> Json<serde_json::Value> {
    Json(json!("I'm alive!"))
}

/// Ready when the spend log is writable and the key store answers; 503 otherwise. Needs a key
/// (master or virtual, as `/models`): only liveness answers without one (docs/reliability.md,
/// "Security").
async fn readiness(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    state.auth().authenticate(&headers).await?;
    let spend_log = state.spend().is_writable() && state.spend().path().exists();
    // Asks the database: an outage shows here even while cached keys still work.
    let keys = state.auth().keys();
    let key_store = keys.ping().await && keys.is_usable();
    let ready = spend_log && key_store;
    let body = json!({
        "status": if ready { "healthy" } else { "unhealthy" },
        "spend_log": if spend_log { "writable" } else { "not writable" },
        "key_store": if key_store { "open" } else { "unavailable" },
        "version": env!("CARGO_PKG_VERSION"),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(body)).into_response())
}

/// The models the caller may use, in OpenAI's list shape.
async fn models(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ProxyError> {
    let caller = state.auth().authenticate(&headers).await?;
    let data: Vec<_> = state
        .model_names()
        .iter()
        .filter(|name| caller.key().is_none_or(|k| k.allows_model(name)))
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tally"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn not_found() -> ProxyError {
    ProxyError::NotFound(
        "no such route; tally serves /chat/completions, /embeddings, /v1/messages, /v1/messages/count_tokens, /v1/responses, /models, /key/*, /health/*"
            .into(),
    )
}
