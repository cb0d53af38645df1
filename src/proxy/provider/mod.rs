//! Providers: what `model: <provider>/<model>` in a `model_list` entry means. Each provider
//! decides, once at start-up, the URL of each call type, the auth header, the model name sent
//! upstream, and its defaults (`api_base`, the key's environment variable, whether a key is
//! required). Nothing here runs per request.
//!
//! Adding a provider: an OpenAI-wire one is a row in [`openai_wire::PROVIDERS`]; one with its own
//! URL or auth scheme is a file like [`azure`] implementing [`Provider`], listed in [`all`].

pub mod anthropic;
pub mod azure;
pub mod openai_wire;

use axum::http::{HeaderName, HeaderValue};

use super::config::{Deployment, EnvLookup};

/// The calls tally relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Chat,
    Embeddings,
    /// Anthropic's Messages API (`/v1/messages`).
    Messages,
    /// Anthropic's `/v1/messages/count_tokens` (relayed, not billed).
    CountTokens,
    /// OpenAI's Responses API (`/v1/responses`).
    Responses,
}

impl CallKind {
    pub const ALL: [CallKind; 5] = [
        Self::Chat,
        Self::Embeddings,
        Self::Messages,
        Self::CountTokens,
        Self::Responses,
    ];
}

/// A `litellm_params` entry as written (after `os.environ/` values are resolved), for a
/// provider to complete with its defaults.
#[derive(Debug, Default)]
pub struct Params {
    /// The model after the provider prefix (`gpt-4o` in `openai/gpt-4o`).
    pub model: String,
    pub api_base: Option<String>,
    pub api_key: Option<String>,
    pub api_version: Option<String>,
    pub azure_ad_token: Option<String>,
    /// The deployment answers locally (`mock_response`): no upstream, so no key or base needed.
    pub mock: bool,
}

/// What a provider resolved: the fields of [`Deployment`] it owns.
#[derive(Debug, PartialEq)]
pub struct Resolved {
    pub upstream_model: String,
    pub api_base: String,
    pub api_key: Option<String>,
    pub api_version: Option<String>,
    pub azure_ad_token: Option<String>,
}

/// Why a provider refused an entry: the field at fault, what is wrong, and the fix.
#[derive(Debug, PartialEq)]
pub struct ParamError {
    pub field: &'static str,
    pub message: String,
    pub fix: String,
}

/// One provider. Implementations are stateless `static`s.
pub trait Provider: Sync + std::fmt::Debug {
    /// The prefix in `model: <name>/...`.
    fn name(&self) -> &'static str;
    /// Fills defaults from the environment and refuses what cannot work.
    fn resolve(&self, params: Params, env: EnvLookup) -> Result<Resolved, ParamError>;
    /// The full upstream URL of a call type.
    fn url(&self, d: &Deployment, call: CallKind) -> String;
    /// The auth header to send, if any.
    fn auth(&self, d: &Deployment) -> Option<(HeaderName, String)>;
    /// Whether the provider answers this call type (checked per request before anything is sent).
    fn supports(&self, call: CallKind) -> bool {
        matches!(call, CallKind::Chat | CallKind::Embeddings)
    }
}

/// Every provider, in the order error messages list them.
pub fn all() -> impl Iterator<Item = &'static dyn Provider> {
    openai_wire::PROVIDERS
        .iter()
        .map(|p| p as &'static dyn Provider)
        .chain(std::iter::once(&azure::AZURE as &'static dyn Provider))
        .chain(std::iter::once(
            &anthropic::ANTHROPIC as &'static dyn Provider,
        ))
}

/// The provider named `name`.
pub fn by_name(name: &str) -> Option<&'static dyn Provider> {
    all().find(|p| p.name() == name)
}

/// The provider of a resolved deployment (`openai` when it names none, as in code-built ones).
pub fn of(d: &Deployment) -> &'static dyn Provider {
    by_name(&d.provider).unwrap_or(&openai_wire::PROVIDERS[0])
}

/// The supported prefixes, comma-separated, for error messages.
pub fn supported_names() -> String {
    all().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

/// Splits `model:` into its provider and the rest. A bare name (`gpt-4o`) means `openai/`, as in
/// LiteLLM. `Err(prefix)` for an unknown prefix.
pub fn split_model(model: &str) -> Result<(&'static dyn Provider, &str), String> {
    match model.split_once('/') {
        Some((prefix, rest)) => match by_name(prefix) {
            Some(p) => Ok((p, rest)),
            None => Err(prefix.to_owned()),
        },
        None => Ok((&openai_wire::PROVIDERS[0], model)),
    }
}

/// The auth header value, marked sensitive so it never shows in debug output.
pub fn header_value(value: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// The first of `vars` that is set (and not empty).
fn first_env(vars: &[&str], env: EnvLookup) -> Option<String> {
    vars.iter().find_map(|v| env(v).filter(|s| !s.is_empty()))
}

/// `base` without trailing slashes, checked to be an http(s) URL.
fn clean_base(base: &str) -> Result<String, ParamError> {
    let base = base.trim().trim_end_matches('/').to_owned();
    if base.starts_with("http://") || base.starts_with("https://") {
        Ok(base)
    } else {
        Err(ParamError {
            field: "api_base",
            message: format!("{base:?} is not an http(s) URL"),
            fix: "write the endpoint's base URL, e.g. https://api.openai.com/v1".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_mean_openai_and_unknown_prefixes_are_named() {
        let (p, rest) = split_model("gpt-4o").unwrap();
        assert_eq!((p.name(), rest), ("openai", "gpt-4o"));
        let (p, rest) = split_model("groq/llama-3.1-8b-instant").unwrap();
        assert_eq!((p.name(), rest), ("groq", "llama-3.1-8b-instant"));
        let (p, rest) = split_model("openrouter/anthropic/claude-3.5-sonnet").unwrap();
        assert_eq!(
            (p.name(), rest),
            ("openrouter", "anthropic/claude-3.5-sonnet")
        );
        assert_eq!(split_model("bedrock/claude").unwrap_err(), "bedrock");
        let (p, rest) = split_model("anthropic/claude-sonnet-4-5").unwrap();
        assert_eq!((p.name(), rest), ("anthropic", "claude-sonnet-4-5"));
        let names = supported_names();
        for n in [
            "openai",
            "azure",
            "groq",
            "ollama_chat",
            "gemini",
            "hosted_vllm",
        ] {
            assert!(names.contains(n), "{names}");
        }
    }
}
