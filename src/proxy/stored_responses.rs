//! `GET` and `DELETE /v1/responses/{id}`: a response the Responses API stored, fetched or deleted
//! at the deployment that made it. Relayed, not billed (no tokens are generated).
//!
//! A response id does not say which deployment made it: the request names the model with
//! `?model=<model_name>`, or else it goes to the first deployment in the config that answers
//! the Responses API (the common case: one OpenAI account).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::error::ProxyError;
use super::provider::{self, CallKind};
use super::upstream::UpstreamClient;

/// Longest response id accepted (OpenAI's are about 60 characters).
const MAX_ID_BYTES: usize = 256;

#[derive(Deserialize)]
pub struct ModelQuery {
    model: Option<String>,
}

pub async fn get_or_delete(
    State(state): State<AppState>,
    method: Method,
    Path(id): Path<String>,
    Query(query): Query<ModelQuery>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    let caller = state.auth().authenticate(&headers).await?;
    if id.is_empty()
        || id.len() > MAX_ID_BYTES
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(ProxyError::bad_param(
            "response_id",
            "a response id is letters, digits, '-' and '_' (as the Responses API returns it, e.g. resp_67cc…)",
        ));
    }
    let route = match query.model.as_deref().filter(|m| !m.is_empty()) {
        Some(model) => {
            let Some(target) = state.resolve(model) else {
                return Err(ProxyError::model_not_found(model, state.model_names()));
            };
            target.group.routes[0].clone()
        }
        None => state.responses_default().cloned().ok_or_else(|| {
            ProxyError::bad_request(
                "no deployment answers the Responses API: add an openai/ or azure/ model to model_list",
            )
        })?,
    };
    let model = route.deployment.model_name.clone();
    if let Some(key) = caller.key()
        && !key.allows_model(&model)
    {
        return Err(ProxyError::Forbidden {
            message: format!("key {} may not use model {model:?}", key.key_name),
            param: Some("model"),
        });
    }
    let d = &route.deployment;
    let p = provider::of(d);
    if !p.supports(CallKind::Responses) || d.mock_response.is_some() {
        return Err(ProxyError::BadRequest {
            message: format!(
                "model {model:?} is served by an {}/ deployment, which does not answer /v1/responses: the Responses API reaches openai/ and azure/ deployments only",
                p.name()
            ),
            param: Some("model".into()),
            code: "unsupported_route_for_model",
        });
    }
    let url = with_id(&p.url(d, CallKind::Responses), &id);
    let endpoint = route.responses.with_url(url);
    let response = state
        .upstream()
        .call(&endpoint, method, &model, None, &[])
        .await?;
    let (content_type, bytes) = UpstreamClient::read_body(response, &endpoint, &model).await?;
    let mut response = (StatusCode::OK, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    Ok(response)
}

/// `…/responses?api-version=v` → `…/responses/{id}?api-version=v`.
fn with_id(url: &str, id: &str) -> String {
    match url.split_once('?') {
        Some((path, query)) => format!("{path}/{id}?{query}"),
        None => format!("{url}/{id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_goes_before_the_query() {
        assert_eq!(
            with_id("https://a/openai/responses?api-version=1", "resp_1"),
            "https://a/openai/responses/resp_1?api-version=1"
        );
        assert_eq!(
            with_id("https://api.openai.com/v1/responses", "resp_1"),
            "https://api.openai.com/v1/responses/resp_1"
        );
    }
}
