//! Azure OpenAI: `azure/<deployment>`.
//!
//! `POST {api_base}/openai/deployments/{deployment}/chat/completions?api-version={api_version}`
//! (and `/embeddings`), the key in an `api-key` header, or an Entra ID token (`azure_ad_token`) as
//! `Authorization: Bearer`. As in LiteLLM (`litellm/main.py`), `AZURE_API_BASE`,
//! `AZURE_OPENAI_API_KEY` / `AZURE_API_KEY`, `AZURE_AD_TOKEN` and `AZURE_API_VERSION` fill what the
//! entry leaves out, and `api_version` defaults to LiteLLM's `AZURE_DEFAULT_API_VERSION`.
//! The deployment name is the operator's own, so the price comes from `model_info.base_model`.

use axum::http::{HeaderName, header};

use super::{CallKind, ParamError, Params, Provider, Resolved, clean_base, first_env};
use crate::proxy::config::{Deployment, EnvLookup};

/// LiteLLM 1.110's `AZURE_DEFAULT_API_VERSION`.
pub const DEFAULT_API_VERSION: &str = "2025-02-01-preview";

const API_KEY: HeaderName = HeaderName::from_static("api-key");

#[derive(Debug)]
pub struct Azure;

pub static AZURE: Azure = Azure;

/// Deployment names and API versions go into the URL as they are: only characters that need no
/// escaping are accepted (Azure allows letters, digits, `-`, `_` and `.` in deployment names).
fn url_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Provider for Azure {
    fn name(&self) -> &'static str {
        "azure"
    }

    fn resolve(&self, p: Params, env: EnvLookup) -> Result<Resolved, ParamError> {
        if !(url_safe(&p.model) || p.model == "*") {
            return Err(ParamError {
                field: "model",
                message: format!("{:?} is not an Azure deployment name", p.model),
                fix: "write model: azure/<deployment name> (letters, digits, '-', '_', '.')".into(),
            });
        }
        let base = match p.api_base.or_else(|| first_env(&["AZURE_API_BASE"], env)) {
            Some(b) => clean_base(&b)?,
            None if p.mock => String::new(),
            None => {
                return Err(ParamError {
                    field: "api_base",
                    message: "an Azure deployment needs its resource's endpoint and none is given (AZURE_API_BASE is not set either)".into(),
                    fix: "set litellm_params.api_base: https://<resource>.openai.azure.com or export AZURE_API_BASE".into(),
                });
            }
        };
        let api_version = p
            .api_version
            .or_else(|| first_env(&["AZURE_API_VERSION"], env))
            .unwrap_or_else(|| DEFAULT_API_VERSION.to_owned());
        if !url_safe(&api_version) {
            return Err(ParamError {
                field: "api_version",
                message: format!("{api_version:?} is not an Azure API version"),
                fix: "write e.g. api_version: \"2024-10-21\"".into(),
            });
        }
        // What the entry says wins over the environment; a key over a token.
        let (api_key, azure_ad_token) = match (p.api_key, p.azure_ad_token) {
            (Some(key), _) => (Some(key), None),
            (None, Some(token)) => (None, Some(token)),
            (None, None) => match first_env(&["AZURE_OPENAI_API_KEY", "AZURE_API_KEY"], env) {
                Some(key) => (Some(key), None),
                None => (None, first_env(&["AZURE_AD_TOKEN"], env)),
            },
        };
        if api_key.is_none() && azure_ad_token.is_none() && !p.mock {
            return Err(ParamError {
                field: "api_key",
                message: "no key for azure: litellm_params.api_key and azure_ad_token are not given and AZURE_OPENAI_API_KEY / AZURE_API_KEY / AZURE_AD_TOKEN are not set".into(),
                fix: "export AZURE_API_KEY=... before starting tally proxy, or write api_key: os.environ/AZURE_API_KEY".into(),
            });
        }
        Ok(Resolved {
            upstream_model: p.model,
            api_base: base,
            api_key,
            api_version: Some(api_version),
            azure_ad_token,
        })
    }

    fn url(&self, d: &Deployment, call: CallKind) -> String {
        let version = d.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
        let path = match call {
            CallKind::Chat => "chat/completions",
            CallKind::Embeddings => "embeddings",
            // Not per deployment: the deployment is named by the body's `model`.
            CallKind::Responses => {
                return format!("{}/openai/responses?api-version={version}", d.api_base);
            }
            // Not supported (see `supports`): never sent.
            CallKind::Messages | CallKind::CountTokens => "messages",
        };
        format!(
            "{}/openai/deployments/{}/{path}?api-version={version}",
            d.api_base, d.upstream_model,
        )
    }

    fn supports(&self, call: CallKind) -> bool {
        matches!(
            call,
            CallKind::Chat | CallKind::Embeddings | CallKind::Responses
        )
    }

    fn auth(&self, d: &Deployment) -> Option<(HeaderName, String)> {
        match (&d.api_key, &d.azure_ad_token) {
            (Some(key), _) => Some((API_KEY, key.clone())),
            (None, Some(token)) => Some((header::AUTHORIZATION, format!("Bearer {token}"))),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            model: "my-gpt4o".into(),
            ..Params::default()
        }
    }

    #[test]
    fn the_environment_fills_base_key_and_version() {
        let env = |v: &str| match v {
            "AZURE_API_BASE" => Some("https://res.openai.azure.com/".to_owned()),
            "AZURE_API_KEY" => Some("az-key".to_owned()),
            "AZURE_API_VERSION" => Some("2024-10-21".to_owned()),
            _ => None,
        };
        let r = AZURE.resolve(params(), &env).unwrap();
        let d = Deployment {
            provider: "azure".into(),
            upstream_model: r.upstream_model,
            api_base: r.api_base,
            api_key: r.api_key,
            api_version: r.api_version,
            ..Deployment::default()
        };
        assert_eq!(
            AZURE.url(&d, CallKind::Chat),
            "https://res.openai.azure.com/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            AZURE.url(&d, CallKind::Embeddings),
            "https://res.openai.azure.com/openai/deployments/my-gpt4o/embeddings?api-version=2024-10-21"
        );
        assert_eq!(
            AZURE.url(&d, CallKind::Responses),
            "https://res.openai.azure.com/openai/responses?api-version=2024-10-21"
        );
        assert_eq!(AZURE.auth(&d), Some((API_KEY, "az-key".to_owned())));
    }

    #[test]
    fn refuses_what_cannot_work_and_takes_an_ad_token() {
        let none = |_: &str| None;
        assert_eq!(
            AZURE.resolve(params(), &none).unwrap_err().field,
            "api_base"
        );
        let based = || Params {
            api_base: Some("https://res.openai.azure.com".into()),
            ..params()
        };
        let err = AZURE.resolve(based(), &none).unwrap_err();
        assert_eq!(err.field, "api_key");
        assert!(err.message.contains("AZURE_API_KEY"), "{}", err.message);
        let token = Params {
            azure_ad_token: Some("eyJ-token".into()),
            ..based()
        };
        let r = AZURE.resolve(token, &none).unwrap();
        assert_eq!(r.api_version.as_deref(), Some(DEFAULT_API_VERSION));
        let d = Deployment {
            azure_ad_token: r.azure_ad_token,
            ..Deployment::default()
        };
        assert_eq!(
            AZURE.auth(&d),
            Some((header::AUTHORIZATION, "Bearer eyJ-token".to_owned()))
        );
        let bad = Params {
            model: "a/b?x".into(),
            ..based()
        };
        assert_eq!(AZURE.resolve(bad, &none).unwrap_err().field, "model");
    }
}
