//! Providers that speak OpenAI's wire format: `{api_base}/chat/completions` and
//! `{api_base}/embeddings` with `Authorization: Bearer <key>`. One row each; defaults and
//! variable names as in LiteLLM (`litellm/litellm_core_utils/get_llm_provider_logic.py` and
//! `litellm/llms/<provider>/chat/transformation.py`, LiteLLM 1.110).

use axum::http::{HeaderName, header};

use super::{CallKind, ParamError, Params, Provider, Resolved, clean_base, first_env};
use crate::proxy::config::{Deployment, EnvLookup};

/// One OpenAI-wire provider.
#[derive(Debug)]
pub struct OpenAiWire {
    pub name: &'static str,
    /// LiteLLM's `api_base` when the config and the environment give none (`None`: required).
    pub default_base: Option<&'static str>,
    /// Variables read for `api_base` when the entry has none, in LiteLLM's order.
    pub base_env: &'static [&'static str],
    /// Variables read for `api_key` when the entry has none, in LiteLLM's order.
    pub key_env: &'static [&'static str],
    /// A server on the operator's own machines: no key needed.
    pub local: bool,
    /// The OpenAI-compatible API lives under `/v1` of the base LiteLLM documents (Ollama's
    /// `http://localhost:11434`); added when the base does not end with it.
    pub append_v1: bool,
}

const fn hosted(
    name: &'static str,
    base: &'static str,
    base_env: &'static [&'static str],
    key_env: &'static [&'static str],
) -> OpenAiWire {
    OpenAiWire {
        name,
        default_base: Some(base),
        base_env,
        key_env,
        local: false,
        append_v1: false,
    }
}

/// The table. `openai` first: bare model names resolve to it.
pub static PROVIDERS: &[OpenAiWire] = &[
    hosted(
        "openai",
        "https://api.openai.com/v1",
        &["OPENAI_BASE_URL", "OPENAI_API_BASE"],
        &["OPENAI_API_KEY"],
    ),
    hosted(
        "groq",
        "https://api.groq.com/openai/v1",
        &["GROQ_API_BASE"],
        &["GROQ_API_KEY"],
    ),
    hosted(
        "deepseek",
        "https://api.deepseek.com/beta",
        &["DEEPSEEK_API_BASE"],
        &["DEEPSEEK_API_KEY"],
    ),
    OpenAiWire {
        append_v1: true,
        ..hosted(
            "mistral",
            "https://api.mistral.ai/v1",
            &["MISTRAL_AZURE_API_BASE"],
            &["MISTRAL_AZURE_API_KEY", "MISTRAL_API_KEY"],
        )
    },
    hosted(
        "together_ai",
        "https://api.together.ai/v1",
        &["TOGETHER_AI_API_BASE"],
        &[
            "TOGETHER_API_KEY",
            "TOGETHER_AI_API_KEY",
            "TOGETHERAI_API_KEY",
            "TOGETHER_AI_TOKEN",
        ],
    ),
    hosted(
        "openrouter",
        "https://openrouter.ai/api/v1",
        &["OPENROUTER_API_BASE"],
        &["OPENROUTER_API_KEY", "OR_API_KEY"],
    ),
    hosted(
        "xai",
        "https://api.x.ai/v1",
        &["XAI_API_BASE"],
        &["XAI_API_KEY"],
    ),
    hosted(
        "fireworks_ai",
        "https://api.fireworks.ai/inference/v1",
        &["FIREWORKS_API_BASE"],
        &[
            "FIREWORKS_API_KEY",
            "FIREWORKS_AI_API_KEY",
            "FIREWORKSAI_API_KEY",
        ],
    ),
    hosted(
        "perplexity",
        "https://api.perplexity.ai",
        &["PERPLEXITY_API_BASE"],
        &["PERPLEXITYAI_API_KEY", "PERPLEXITY_API_KEY"],
    ),
    hosted(
        "cerebras",
        "https://api.cerebras.ai/v1",
        &["CEREBRAS_API_BASE"],
        &["CEREBRAS_API_KEY"],
    ),
    // Google's OpenAI-compatible endpoint (LiteLLM's own `gemini/` calls the native API; its
    // GEMINI_API_BASE names the native base, so it is not read here).
    hosted(
        "gemini",
        "https://generativelanguage.googleapis.com/v1beta/openai",
        &[],
        &["GOOGLE_API_KEY", "GEMINI_API_KEY"],
    ),
    OpenAiWire {
        name: "hosted_vllm",
        default_base: None,
        base_env: &["HOSTED_VLLM_API_BASE"],
        key_env: &["HOSTED_VLLM_API_KEY"],
        local: true,
        append_v1: false,
    },
    OpenAiWire {
        name: "lm_studio",
        default_base: None,
        base_env: &["LM_STUDIO_API_BASE"],
        key_env: &["LM_STUDIO_API_KEY"],
        local: true,
        append_v1: false,
    },
    OpenAiWire {
        name: "ollama",
        default_base: Some("http://localhost:11434"),
        base_env: &["OLLAMA_API_BASE"],
        key_env: &["OLLAMA_API_KEY"],
        local: true,
        append_v1: true,
    },
    OpenAiWire {
        name: "ollama_chat",
        default_base: Some("http://localhost:11434"),
        base_env: &["OLLAMA_API_BASE"],
        key_env: &["OLLAMA_API_KEY"],
        local: true,
        append_v1: true,
    },
];

impl Provider for OpenAiWire {
    fn name(&self) -> &'static str {
        self.name
    }

    fn resolve(&self, p: Params, env: EnvLookup) -> Result<Resolved, ParamError> {
        let custom_base = p.api_base.or_else(|| first_env(self.base_env, env));
        let explicit_base = custom_base.is_some();
        let base = match custom_base.as_deref().or(self.default_base) {
            Some(b) => clean_base(b)?,
            None => {
                return Err(ParamError {
                    field: "api_base",
                    message: format!("{} needs the server's address and none is given", self.name),
                    fix: format!(
                        "set litellm_params.api_base (e.g. http://localhost:8000/v1){}",
                        env_hint(self.base_env)
                    ),
                });
            }
        };
        let api_base = if self.append_v1 && !base.ends_with("/v1") {
            format!("{base}/v1")
        } else {
            base
        };
        let api_key = p.api_key.or_else(|| first_env(self.key_env, env));
        // A key is needed to call the provider's own service; a self-hosted endpoint at a
        // custom api_base (or a local server) may take none.
        if api_key.is_none() && !self.local && !explicit_base && !p.mock {
            return Err(ParamError {
                field: "api_key",
                message: format!(
                    "no key for {}: litellm_params.api_key is not given and {} is not set",
                    self.name,
                    self.key_env.join(" / ")
                ),
                fix: format!(
                    "export {}=... before starting tally proxy, or write api_key: os.environ/<VARIABLE>",
                    self.key_env.first().copied().unwrap_or("API_KEY")
                ),
            });
        }
        Ok(Resolved {
            upstream_model: p.model,
            api_base,
            api_key,
            api_version: None,
            azure_ad_token: None,
        })
    }

    fn url(&self, d: &Deployment, call: CallKind) -> String {
        let path = match call {
            CallKind::Chat => "/chat/completions",
            CallKind::Embeddings => "/embeddings",
            CallKind::Responses => "/responses",
            // Not supported (see `supports`): never sent.
            CallKind::Messages | CallKind::CountTokens => "/messages",
        };
        format!("{}{path}", d.api_base)
    }

    fn auth(&self, d: &Deployment) -> Option<(HeaderName, String)> {
        let key = d.api_key.as_deref()?;
        Some((header::AUTHORIZATION, format!("Bearer {key}")))
    }

    /// The Responses API is OpenAI's own (an `openai/` entry may point at any server that
    /// implements it, via `api_base`).
    fn supports(&self, call: CallKind) -> bool {
        match call {
            CallKind::Chat | CallKind::Embeddings => true,
            CallKind::Responses => self.name == "openai",
            CallKind::Messages | CallKind::CountTokens => false,
        }
    }
}

fn env_hint(vars: &[&str]) -> String {
    match vars.first() {
        Some(v) => format!(" or export {v}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::provider::by_name;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn params(model: &str) -> Params {
        Params {
            model: model.into(),
            ..Params::default()
        }
    }

    #[test]
    fn hosted_providers_use_litellm_defaults_and_key_variables() {
        let cases = [
            ("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
            ("groq", "https://api.groq.com/openai/v1", "GROQ_API_KEY"),
            (
                "deepseek",
                "https://api.deepseek.com/beta",
                "DEEPSEEK_API_KEY",
            ),
            ("mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
            (
                "together_ai",
                "https://api.together.ai/v1",
                "TOGETHERAI_API_KEY",
            ),
            (
                "openrouter",
                "https://openrouter.ai/api/v1",
                "OPENROUTER_API_KEY",
            ),
            ("xai", "https://api.x.ai/v1", "XAI_API_KEY"),
            (
                "fireworks_ai",
                "https://api.fireworks.ai/inference/v1",
                "FIREWORKS_AI_API_KEY",
            ),
            (
                "perplexity",
                "https://api.perplexity.ai",
                "PERPLEXITYAI_API_KEY",
            ),
            ("cerebras", "https://api.cerebras.ai/v1", "CEREBRAS_API_KEY"),
            (
                "gemini",
                "https://generativelanguage.googleapis.com/v1beta/openai",
                "GEMINI_API_KEY",
            ),
        ];
        for (name, base, var) in cases {
            let p = by_name(name).unwrap();
            let env = |v: &str| (v == var).then(|| format!("key-of-{name}"));
            let r = p.resolve(params("m"), &env).unwrap();
            assert_eq!(r.api_base, base, "{name}");
            assert_eq!(
                r.api_key.as_deref(),
                Some(format!("key-of-{name}").as_str())
            );
            // No key anywhere: refused, naming the variable.
            let err = p.resolve(params("m"), &no_env).unwrap_err();
            assert_eq!(err.field, "api_key");
            assert!(err.message.contains(var), "{name}: {}", err.message);
        }
    }

    #[test]
    fn local_providers_need_no_key_and_some_need_a_base() {
        let ollama = by_name("ollama_chat").unwrap();
        let r = ollama.resolve(params("llama3"), &no_env).unwrap();
        assert_eq!(r.api_base, "http://localhost:11434/v1");
        assert_eq!(r.api_key, None);
        let custom = Params {
            api_base: Some("http://gpu-box:11434/".into()),
            ..params("llama3")
        };
        assert_eq!(
            ollama.resolve(custom, &no_env).unwrap().api_base,
            "http://gpu-box:11434/v1"
        );
        for name in ["hosted_vllm", "lm_studio"] {
            let err = by_name(name)
                .unwrap()
                .resolve(params("m"), &no_env)
                .unwrap_err();
            assert_eq!(err.field, "api_base", "{name}");
        }
        let env = |v: &str| (v == "HOSTED_VLLM_API_BASE").then(|| "http://vllm:8000/v1".to_owned());
        let r = by_name("hosted_vllm")
            .unwrap()
            .resolve(params("m"), &env)
            .unwrap();
        assert_eq!(r.api_base, "http://vllm:8000/v1");
    }

    #[test]
    fn a_custom_base_may_go_without_a_key() {
        let p = Params {
            api_base: Some("http://127.0.0.1:9/v1".into()),
            ..params("m")
        };
        let r = by_name("openai").unwrap().resolve(p, &no_env).unwrap();
        assert_eq!(r.api_key, None);
    }
}
