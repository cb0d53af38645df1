//! Anthropic: `anthropic/<model>`, the Messages API.
//!
//! `POST {api_base}/v1/messages` (and `/v1/messages/count_tokens`) with the key in `x-api-key`.
//! As in LiteLLM (`litellm/llms/anthropic/`), `api_base` defaults to `https://api.anthropic.com`
//! (`ANTHROPIC_API_BASE` / `ANTHROPIC_BASE_URL` override it) and the key comes from
//! `ANTHROPIC_API_KEY` when the entry has none. The `anthropic-version` and `anthropic-beta`
//! headers are the client's, forwarded per request by the relay.

use axum::http::HeaderName;

use super::{CallKind, ParamError, Params, Provider, Resolved, clean_base, first_env};
use crate::proxy::config::{Deployment, EnvLookup};

pub const DEFAULT_API_BASE: &str = "https://api.anthropic.com";
/// Sent when the client names no `anthropic-version` (the only version Anthropic documents).
pub const DEFAULT_VERSION: &str = "2023-06-01";

pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

#[derive(Debug)]
pub struct Anthropic;

pub static ANTHROPIC: Anthropic = Anthropic;

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn resolve(&self, p: Params, env: EnvLookup) -> Result<Resolved, ParamError> {
        let custom = p
            .api_base
            .or_else(|| first_env(&["ANTHROPIC_API_BASE", "ANTHROPIC_BASE_URL"], env));
        let explicit_base = custom.is_some();
        let mut base = clean_base(custom.as_deref().unwrap_or(DEFAULT_API_BASE))?;
        // `https://api.anthropic.com/v1` is written as often as the bare host: the paths below
        // add `/v1` themselves.
        if let Some(stripped) = base.strip_suffix("/v1") {
            base = stripped.to_owned();
        }
        let api_key = p.api_key.or_else(|| first_env(&["ANTHROPIC_API_KEY"], env));
        if api_key.is_none() && !explicit_base && !p.mock {
            return Err(ParamError {
                field: "api_key",
                message: "no key for anthropic: litellm_params.api_key is not given and ANTHROPIC_API_KEY is not set".into(),
                fix: "export ANTHROPIC_API_KEY=... before starting tally proxy, or write api_key: os.environ/ANTHROPIC_API_KEY".into(),
            });
        }
        Ok(Resolved {
            upstream_model: p.model,
            api_base: base,
            api_key,
            api_version: None,
            azure_ad_token: None,
        })
    }

    fn url(&self, d: &Deployment, call: CallKind) -> String {
        let path = match call {
            CallKind::CountTokens => "/v1/messages/count_tokens",
            // Chat is translated to a Messages call; embeddings and responses are refused
            // before sending (see `supports`).
            _ => "/v1/messages",
        };
        format!("{}{path}", d.api_base)
    }

    fn auth(&self, d: &Deployment) -> Option<(HeaderName, String)> {
        Some((API_KEY, d.api_key.clone()?))
    }

    /// Chat is translated to the Messages API by the relay (`proxy::anthropic_chat`).
    fn supports(&self, call: CallKind) -> bool {
        matches!(
            call,
            CallKind::Chat | CallKind::Messages | CallKind::CountTokens
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(p: Params, env: EnvLookup) -> Deployment {
        let r = ANTHROPIC.resolve(p, env).unwrap();
        Deployment {
            provider: "anthropic".into(),
            upstream_model: r.upstream_model,
            api_base: r.api_base,
            api_key: r.api_key,
            ..Deployment::default()
        }
    }

    #[test]
    fn defaults_to_anthropic_with_the_key_from_the_environment() {
        let env = |v: &str| (v == "ANTHROPIC_API_KEY").then(|| "sk-ant-1".to_owned());
        let d = resolved(
            Params {
                model: "claude-sonnet-4-5".into(),
                ..Params::default()
            },
            &env,
        );
        assert_eq!(
            ANTHROPIC.url(&d, CallKind::Messages),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            ANTHROPIC.url(&d, CallKind::CountTokens),
            "https://api.anthropic.com/v1/messages/count_tokens"
        );
        assert_eq!(ANTHROPIC.auth(&d), Some((API_KEY, "sk-ant-1".to_owned())));
        assert!(ANTHROPIC.supports(CallKind::Messages));
        assert!(!ANTHROPIC.supports(CallKind::Responses));
    }

    #[test]
    fn a_base_ending_in_v1_is_not_doubled_and_no_key_is_refused() {
        let none = |_: &str| None;
        let d = resolved(
            Params {
                model: "m".into(),
                api_base: Some("http://127.0.0.1:9/v1/".into()),
                ..Params::default()
            },
            &none,
        );
        assert_eq!(
            ANTHROPIC.url(&d, CallKind::Messages),
            "http://127.0.0.1:9/v1/messages"
        );
        let err = ANTHROPIC
            .resolve(
                Params {
                    model: "m".into(),
                    ..Params::default()
                },
                &none,
            )
            .unwrap_err();
        assert_eq!(err.field, "api_key");
        assert!(err.message.contains("ANTHROPIC_API_KEY"), "{}", err.message);
    }
}
