//! The proxy's configuration: LiteLLM's `config.yaml` (the subset tally implements), tally's own
//! `tally_settings:` block, and their `TALLY_*` / `LITELLM_MASTER_KEY` environment overrides.
//!
//! Precedence, lowest first: built-in defaults, the YAML file, `TALLY_*` variables, CLI flags
//! (applied by the caller with [`ProxyConfig::with_spend_log`] / [`ProxyConfig::with_state_dir`]).
//! Every error names the file, the entry and what to change.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::pricing::{ParamPrices, PriceKeys};
use super::provider::{self, Params};
use super::router::{Alias, RouterSettings};
use super::server::ServerLimits;

/// Default upstream when a deployment names no `api_base`.
pub const OPENAI_API_BASE: &str = "https://api.openai.com/v1";
/// LiteLLM's default request timeout.
pub const DEFAULT_TIMEOUT_SECS: f64 = 600.0;
/// Default rotation size of the live spend log (100 MiB).
pub const DEFAULT_SPEND_LOG_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Default request body limit (16 MiB, enough for long multi-turn chats).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Master keys shorter than this are refused as weak.
pub const MIN_MASTER_KEY_LEN: usize = 16;
/// Values published in docs and examples; anyone can guess them.
const KNOWN_WEAK_MASTER_KEYS: &[&str] = &[
    "sk-1234",
    "sk-12345",
    "sk-123456",
    "sk-1234567890",
    "changeme",
    "change-me",
    "password",
    "secret",
    "admin",
    "master_key",
    "sk-master-key",
    "your-master-key",
];
/// The callbacks tally accepts: billing to Lago is done by `tally ship` from the spend log.
const SUPPORTED_CALLBACKS: &[&str] = &["lago"];
/// How to make a strong master key; quoted in every refusal.
pub const MASTER_KEY_FIX: &str = "set a long random master key, e.g. export LITELLM_MASTER_KEY=\"sk-$(openssl rand -hex 24)\" \
     (or general_settings.master_key: os.environ/LITELLM_MASTER_KEY), or, for a throwaway local \
     trial only, set tally_settings.allow_weak_master_key: true (TALLY_ALLOW_WEAK_MASTER_KEY=1)";

/// One `model_list[]` entry, resolved: what the proxy calls when a client asks for `model_name`.
/// Several entries may share a `model_name`: they form a group ([`super::router`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Deployment {
    /// The name clients use (`model` in their request).
    pub model_name: String,
    /// The provider prefix of `model:` (`openai` for a bare name), see [`super::provider`].
    pub provider: String,
    /// The provider's model name (after `<provider>/`), substituted into the upstream request;
    /// for Azure, the deployment name.
    pub upstream_model: String,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub api_base: String,
    pub api_key: Option<String>,
    /// Azure's `api-version` query parameter.
    pub api_version: Option<String>,
    /// Azure: an Entra ID token sent as `Authorization: Bearer` when there is no `api_key`.
    pub azure_ad_token: Option<String>,
    /// `model_info.base_model`: the model an Azure deployment runs, for its price.
    pub base_model: Option<String>,
    /// `simple-shuffle` weights within the group: `weight`, else `rpm`, else `tpm`.
    pub weight: Option<f64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub timeout: Duration,
    pub input_cost_per_token: Option<f64>,
    pub output_cost_per_token: Option<f64>,
    /// Every LiteLLM price name set in `litellm_params` (the two above included), laid over the
    /// listed model's prices.
    pub prices: PriceKeys,
    /// Answer locally with this text instead of calling the upstream.
    pub mock_response: Option<String>,
}

/// tally's own settings (`tally_settings:`; each also `TALLY_<UPPERCASE NAME>`).
#[derive(Debug, Clone, PartialEq)]
pub struct TallySettings {
    pub spend_log: PathBuf,
    pub state_dir: PathBuf,
    /// Rotate the live spend log once it would grow past this many bytes (0 = never).
    pub spend_log_max_bytes: u64,
    pub max_body_bytes: usize,
    /// A LiteLLM `model_prices_and_context_window.json`, layered over the built-in prices.
    pub price_file: Option<PathBuf>,
    pub allow_weak_master_key: bool,
    /// Cached keys are re-read this often: a key deleted or blocked on another replica stops
    /// working here within it (`key_revalidate_secs`, default 4).
    pub key_revalidate: Duration,
    /// Cached keys keep working this long while the key database does not answer
    /// (`key_outage_grace_secs`, default 300).
    pub key_outage_grace: Duration,
    /// Connection limit and client timeouts (`*_timeout_secs`, `max_connections`).
    pub server: ServerLimits,
}

impl Default for TallySettings {
    fn default() -> Self {
        Self {
            spend_log: PathBuf::from(crate::spend::DEFAULT_SPEND_LOG),
            state_dir: PathBuf::from(crate::spend::DEFAULT_STATE_DIR),
            spend_log_max_bytes: DEFAULT_SPEND_LOG_MAX_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            price_file: None,
            allow_weak_master_key: false,
            key_revalidate: Duration::from_secs(4),
            key_outage_grace: Duration::from_secs(300),
            server: ServerLimits::default(),
        }
    }
}

/// The whole, validated proxy configuration.
#[derive(Clone, PartialEq)]
pub struct ProxyConfig {
    /// Where the config came from (a path or a label), for messages.
    pub source: String,
    pub deployments: Vec<Deployment>,
    /// Retries, cooldown and fallbacks between groups.
    pub router: RouterSettings,
    pub master_key: Option<String>,
    /// `general_settings.database_url` / `DATABASE_URL`: keys in PostgreSQL, shared by replicas.
    pub database_url: Option<String>,
    pub settings: TallySettings,
    /// Callbacks in `litellm_settings.callbacks` that tally does not implement (warned at start).
    pub unsupported_callbacks: Vec<String>,
    /// `litellm_params` tally does not apply, per entry: `model_list[i] (name): a, b` (warned at
    /// start).
    pub unapplied_params: Vec<String>,
}

impl std::fmt::Debug for ProxyConfig {
    // Hand-written so the master key and upstream keys never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("source", &self.source)
            .field(
                "models",
                &self
                    .deployments
                    .iter()
                    .map(|d| &d.model_name)
                    .collect::<Vec<_>>(),
            )
            .field(
                "master_key",
                &self.master_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "<redacted>"),
            )
            .field("settings", &self.settings)
            .finish()
    }
}

/// Why the configuration was refused. Each message names the file, the entry and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: invalid YAML{at}: {message}")]
    Yaml {
        file: String,
        at: String,
        message: String,
    },
    #[error("{file}: {entry}: {message}; {fix}")]
    Entry {
        file: String,
        entry: String,
        message: String,
        fix: String,
    },
    #[error("{file}: {message}; {MASTER_KEY_FIX}")]
    MasterKey { file: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{file}: {message}")]
    Setting { file: String, message: String },
}

// ---- the YAML as written ----------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_list: Vec<RawModel>,
    #[serde(default)]
    litellm_settings: RawLitellmSettings,
    #[serde(default)]
    general_settings: RawGeneralSettings,
    #[serde(default)]
    router_settings: RawRouterSettings,
    #[serde(default)]
    tally_settings: RawTallySettings,
}

#[derive(Debug, Deserialize)]
struct RawModel {
    model_name: Option<String>,
    litellm_params: Option<RawParams>,
    #[serde(default)]
    model_info: RawModelInfo,
}

#[derive(Debug, Default, Deserialize)]
struct RawModelInfo {
    base_model: Option<String>,
}

/// `[{"gpt-4o": ["gpt-4o-mini"]}]`, LiteLLM's shape of a fallback list.
type RawFallbacks = Vec<HashMap<String, Vec<String>>>;

/// The router's settings tally implements; the many others LiteLLM has (Redis, budgets) are
/// accepted and ignored.
#[derive(Debug, Default, Deserialize)]
struct RawRouterSettings {
    num_retries: Option<u32>,
    allowed_fails: Option<u32>,
    cooldown_time: Option<f64>,
    fallbacks: Option<RawFallbacks>,
    context_window_fallbacks: Option<RawFallbacks>,
    default_fallbacks: Option<Vec<String>>,
    content_policy_fallbacks: Option<RawFallbacks>,
    routing_strategy: Option<String>,
    timeout: Option<f64>,
    #[serde(default)]
    model_group_alias: HashMap<String, RawAlias>,
}

/// `model_group_alias` values: a group name, or `{model: <group>, hidden: true}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAlias {
    Name(String),
    Full {
        model: String,
        #[serde(default)]
        hidden: bool,
    },
}

#[derive(Debug, Deserialize)]
struct RawParams {
    model: Option<String>,
    api_key: Option<String>,
    api_base: Option<String>,
    timeout: Option<f64>,
    input_cost_per_token: Option<f64>,
    output_cost_per_token: Option<f64>,
    mock_response: Option<String>,
    /// The other LiteLLM price names (`cache_read_input_token_cost`, tiers, ...).
    #[serde(flatten)]
    prices: ParamPrices,
    api_version: Option<String>,
    azure_ad_token: Option<String>,
    weight: Option<f64>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    /// Everything else LiteLLM accepts here (`temperature`, `extra_headers`, ...): not applied by
    /// tally, and named in a start-up warning.
    #[serde(flatten)]
    other: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLitellmSettings {
    #[serde(default)]
    callbacks: Vec<String>,
    #[serde(default)]
    success_callback: Vec<String>,
    num_retries: Option<u32>,
    allowed_fails: Option<u32>,
    cooldown_time: Option<f64>,
    fallbacks: Option<RawFallbacks>,
    context_window_fallbacks: Option<RawFallbacks>,
    content_policy_fallbacks: Option<RawFallbacks>,
    default_fallbacks: Option<Vec<String>>,
    request_timeout: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawGeneralSettings {
    master_key: Option<String>,
    database_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTallySettings {
    spend_log: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    spend_log_max_bytes: Option<u64>,
    max_body_bytes: Option<usize>,
    price_file: Option<PathBuf>,
    allow_weak_master_key: Option<bool>,
    key_revalidate_secs: Option<f64>,
    key_outage_grace_secs: Option<f64>,
    header_read_timeout_secs: Option<f64>,
    body_read_timeout_secs: Option<f64>,
    idle_timeout_secs: Option<f64>,
    max_connections: Option<usize>,
}

/// Looks up an environment variable; injected so tests need not touch the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl ProxyConfig {
    /// Reads `path`, resolves `os.environ/` values, applies `TALLY_*` and `LITELLM_MASTER_KEY`,
    /// and refuses a missing or weak master key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::load_from_str(&text, &path.display().to_string(), &process_env)
    }

    /// [`ProxyConfig::load`] on text, with an explicit environment.
    pub fn load_from_str(text: &str, source: &str, env: EnvLookup) -> Result<Self, ConfigError> {
        let mut config = Self::parse(text, source, env)?;
        config.apply_env(env)?;
        config.check_master_key()?;
        Ok(config)
    }

    /// Builds a configuration from YAML text in code (tests, `tally demo`): `os.environ/` values
    /// are resolved, but `TALLY_*` variables are not applied. The master key is checked.
    pub fn from_yaml_str(text: &str, source: &str) -> Result<Self, ConfigError> {
        let config = Self::parse(text, source, &process_env)?;
        config.check_master_key()?;
        Ok(config)
    }

    /// Overrides the live spend log path (the `--spend-log` flag).
    pub fn with_spend_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.spend_log = path.into();
        self
    }

    /// Overrides the state directory (the `--state-dir` flag).
    pub fn with_state_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.state_dir = path.into();
        self
    }

    fn parse(text: &str, source: &str, env: EnvLookup) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| yaml_error(source, &e))?
        };

        let entry_error = |entry: String, message: String, fix: &str| ConfigError::Entry {
            file: source.to_owned(),
            entry,
            message,
            fix: fix.to_owned(),
        };

        // LiteLLM's default for deployments without their own `timeout`.
        let default_timeout = raw
            .router_settings
            .timeout
            .or(raw.litellm_settings.request_timeout);
        let mut deployments = Vec::with_capacity(raw.model_list.len());
        let mut seen = HashSet::new();
        let mut unapplied_params = Vec::new();
        for (i, m) in raw.model_list.into_iter().enumerate() {
            let Some(model_name) = m.model_name.filter(|n| !n.trim().is_empty()) else {
                return Err(entry_error(
                    format!("model_list[{i}]"),
                    "has no model_name".into(),
                    "give every entry a model_name: the name clients send as `model`",
                ));
            };
            let entry = format!("model_list[{i}] (model_name {model_name:?})");
            let Some(params) = m.litellm_params else {
                return Err(entry_error(
                    entry,
                    "has no litellm_params".into(),
                    "add litellm_params with at least `model: openai/<model>`",
                ));
            };
            seen.insert(model_name.clone());
            let names: Vec<&str> = params
                .other
                .keys()
                .map(String::as_str)
                // Price names are read by the flattened `prices` beside this map.
                .filter(|k| !super::pricing::is_price_key(k))
                .collect();
            if !names.is_empty() {
                unapplied_params.push(format!("{entry}: {}", names.join(", ")));
            }
            let resolve = |field: &str,
                           value: Option<String>|
             -> Result<Option<String>, ConfigError> {
                value
                    .map(|v| resolve_env_value(&v, env))
                    .transpose()
                    .map_err(|var| {
                        entry_error(
                            format!("{entry}.litellm_params.{field}"),
                            format!("environment variable {var} (from os.environ/{var}) is not set"),
                            &format!("export {var}=... before starting tally proxy, or write the value directly"),
                        )
                    })
            };
            let model = resolve("model", params.model)?.unwrap_or_default();
            let (provider, provider_model) = provider::split_model(&model).map_err(|prefix| {
                entry_error(
                    format!("{entry}.litellm_params.model"),
                    format!("unknown provider {prefix:?} in {model:?}"),
                    &format!(
                        "tally supports these providers: {}; for another OpenAI-compatible API write `model: openai/<model>` with its `api_base`",
                        provider::supported_names()
                    ),
                )
            })?;
            if provider_model.is_empty() {
                return Err(entry_error(
                    format!("{entry}.litellm_params.model"),
                    format!("{model:?} names no model after the provider"),
                    "write `model: <provider>/<model>`, e.g. openai/gpt-4o",
                ));
            }
            let resolved = provider
                .resolve(
                    Params {
                        model: provider_model.to_owned(),
                        api_base: resolve("api_base", params.api_base)?,
                        api_key: resolve("api_key", params.api_key)?,
                        api_version: resolve("api_version", params.api_version)?,
                        azure_ad_token: resolve("azure_ad_token", params.azure_ad_token)?,
                        mock: params.mock_response.is_some(),
                    },
                    env,
                )
                .map_err(|e| {
                    entry_error(
                        format!("{entry}.litellm_params.{}", e.field),
                        e.message,
                        &e.fix,
                    )
                })?;
            if let Some(w) = params.weight
                && !(w.is_finite() && w >= 0.0)
            {
                return Err(entry_error(
                    format!("{entry}.litellm_params.weight"),
                    format!("{w} is not a non-negative weight"),
                    "write a relative weight, e.g. weight: 9 beside another deployment's weight: 1",
                ));
            }
            let timeout = params
                .timeout
                .or(default_timeout)
                .unwrap_or(DEFAULT_TIMEOUT_SECS);
            if !(timeout.is_finite() && timeout > 0.0) {
                return Err(entry_error(
                    format!("{entry}.litellm_params.timeout"),
                    format!("{timeout} is not a positive number of seconds"),
                    "write the timeout in seconds, e.g. timeout: 30",
                ));
            }
            for (field, cost) in [
                ("input_cost_per_token", params.input_cost_per_token),
                ("output_cost_per_token", params.output_cost_per_token),
            ] {
                if let Some(c) = cost
                    && !(c.is_finite() && c >= 0.0)
                {
                    return Err(entry_error(
                        format!("{entry}.litellm_params.{field}"),
                        format!("{c} is not a non-negative price"),
                        "write the USD price of one token, e.g. 0.0000025",
                    ));
                }
            }
            let mut prices = params.prices.prices;
            if let Some((key, reason)) = params.prices.invalid.into_iter().next() {
                return Err(entry_error(
                    format!("{entry}.litellm_params.{key}"),
                    reason,
                    "write the USD price of one token, e.g. 0.0000025",
                ));
            }
            for (key, cost) in [
                ("input_cost_per_token", params.input_cost_per_token),
                ("output_cost_per_token", params.output_cost_per_token),
            ] {
                if let Some(c) = cost {
                    let _ = prices.insert(key, c);
                }
            }
            deployments.push(Deployment {
                model_name,
                provider: provider.name().to_owned(),
                upstream_model: resolved.upstream_model,
                api_base: resolved.api_base,
                api_key: resolved.api_key,
                api_version: resolved.api_version,
                azure_ad_token: resolved.azure_ad_token,
                base_model: m.model_info.base_model,
                weight: params.weight,
                rpm: params.rpm,
                tpm: params.tpm,
                timeout: Duration::from_secs_f64(timeout),
                input_cost_per_token: params.input_cost_per_token,
                output_cost_per_token: params.output_cost_per_token,
                prices,
                mock_response: params.mock_response,
            });
        }

        let master_key = raw
            .general_settings
            .master_key
            .map(|v| resolve_env_value(&v, env))
            .transpose()
            .map_err(|var| ConfigError::MasterKey {
                file: source.to_owned(),
                message: format!(
                    "general_settings.master_key refers to os.environ/{var}, which is not set"
                ),
            })?;

        let router = router_settings(
            raw.router_settings,
            &mut raw.litellm_settings,
            &seen,
            source,
        )?;
        let database_url = raw
            .general_settings
            .database_url
            .map(|v| resolve_env_value(&v, env))
            .transpose()
            .map_err(|var| ConfigError::Setting {
                file: source.to_owned(),
                message: format!(
                    "general_settings.database_url refers to os.environ/{var}, which is not set"
                ),
            })?;
        let key_secs = |name: &str, value: Option<f64>, default: Duration| match value {
            None => Ok(default),
            Some(v) => positive_secs(v).ok_or_else(|| ConfigError::Setting {
                file: source.to_owned(),
                message: format!(
                    "tally_settings.{name} is {v}; write a positive number of seconds"
                ),
            }),
        };
        let key_revalidate = key_secs(
            "key_revalidate_secs",
            raw.tally_settings.key_revalidate_secs,
            TallySettings::default().key_revalidate,
        )?;
        let key_outage_grace = key_secs(
            "key_outage_grace_secs",
            raw.tally_settings.key_outage_grace_secs,
            TallySettings::default().key_outage_grace,
        )?;

        let mut callbacks = raw.litellm_settings.callbacks;
        callbacks.extend(raw.litellm_settings.success_callback);
        let mut unsupported_callbacks: Vec<String> = callbacks
            .into_iter()
            .filter(|c| !SUPPORTED_CALLBACKS.contains(&c.as_str()))
            .collect();
        unsupported_callbacks.dedup();

        let defaults = TallySettings::default();
        let t = raw.tally_settings;
        let settings = TallySettings {
            spend_log: t.spend_log.unwrap_or(defaults.spend_log),
            state_dir: t.state_dir.unwrap_or(defaults.state_dir),
            spend_log_max_bytes: t
                .spend_log_max_bytes
                .unwrap_or(defaults.spend_log_max_bytes),
            max_body_bytes: t.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            price_file: t.price_file,
            allow_weak_master_key: t.allow_weak_master_key.unwrap_or(false),
            key_revalidate,
            key_outage_grace,
            server: server_limits(
                source,
                [
                    t.header_read_timeout_secs,
                    t.body_read_timeout_secs,
                    t.idle_timeout_secs,
                ],
                t.max_connections,
            )?,
        };

        Ok(Self {
            source: source.to_owned(),
            deployments,
            router,
            master_key,
            database_url,
            settings,
            unsupported_callbacks,
            unapplied_params,
        })
    }

    /// `TALLY_*` variables override `tally_settings`; `LITELLM_MASTER_KEY` fills a missing
    /// `general_settings.master_key`.
    fn apply_env(&mut self, env: EnvLookup) -> Result<(), ConfigError> {
        let s = &mut self.settings;
        if let Some(v) = env("TALLY_SPEND_LOG") {
            s.spend_log = v.into();
        }
        if let Some(v) = env("TALLY_STATE_DIR") {
            s.state_dir = v.into();
        }
        if let Some(v) = env("TALLY_SPEND_LOG_MAX_BYTES") {
            s.spend_log_max_bytes = parse_env("TALLY_SPEND_LOG_MAX_BYTES", &v)?;
        }
        if let Some(v) = env("TALLY_MAX_BODY_BYTES") {
            s.max_body_bytes = parse_env("TALLY_MAX_BODY_BYTES", &v)?;
        }
        if let Some(v) = env("TALLY_PRICE_FILE") {
            s.price_file = Some(v.into());
        }
        if let Some(v) = env("TALLY_ALLOW_WEAK_MASTER_KEY") {
            s.allow_weak_master_key = parse_bool("TALLY_ALLOW_WEAK_MASTER_KEY", &v)?;
        }
        for (var, _, field) in TIMEOUT_SETTINGS {
            if let Some(v) = env(var) {
                let secs = v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .and_then(positive_secs)
                    .ok_or_else(|| ConfigError::Env {
                        var: var.to_owned(),
                        message: format!(
                            "{v:?} is not a positive number of seconds; write e.g. 30 or 0.5"
                        ),
                    })?;
                *field(&mut s.server) = secs;
            }
        }
        if let Some(v) = env("TALLY_MAX_CONNECTIONS") {
            s.server.max_connections = parse_env("TALLY_MAX_CONNECTIONS", &v)?;
            if s.server.max_connections == 0 {
                return Err(ConfigError::Env {
                    var: "TALLY_MAX_CONNECTIONS".into(),
                    message: "0 would refuse every connection; write at least 1".into(),
                });
            }
        }
        if self.master_key.is_none() {
            self.master_key = env("LITELLM_MASTER_KEY").filter(|k| !k.is_empty());
        }
        if self.database_url.is_none() {
            self.database_url = env("DATABASE_URL").filter(|u| !u.is_empty());
        }
        if let Some(url) = &self.database_url
            && !crate::proxy::keystore::is_postgres_url(url)
        {
            return Err(ConfigError::Setting {
                file: self.source.clone(),
                message: "general_settings.database_url / DATABASE_URL must start with postgres:// or postgresql:// \
                          (tally keeps keys in PostgreSQL or, without it, in SQLite in the state dir)"
                    .into(),
            });
        }
        Ok(())
    }

    fn check_master_key(&self) -> Result<(), ConfigError> {
        if self.settings.allow_weak_master_key {
            return Ok(());
        }
        let refuse = |message: String| ConfigError::MasterKey {
            file: self.source.clone(),
            message,
        };
        match &self.master_key {
            None => Err(refuse(
                "no master key: neither general_settings.master_key nor LITELLM_MASTER_KEY is set, \
                 so anyone could call the proxy and mint keys"
                    .into(),
            )),
            Some(key) if is_weak_master_key(key) => Err(refuse(format!(
                "the master key is weak (publicly known or shorter than {MIN_MASTER_KEY_LEN} characters)"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The (first) deployment clients reach as `model_name`.
    pub fn deployment(&self, model_name: &str) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.model_name == model_name)
    }

    /// The distinct model names, in config order.
    pub fn model_names(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.deployments
            .iter()
            .filter(|d| seen.insert(d.model_name.as_str()))
            .map(|d| d.model_name.clone())
            .collect()
    }
}

/// `router_settings`, falling back to their `litellm_settings` equivalents, checked against the
/// model names the config serves.
fn router_settings(
    r: RawRouterSettings,
    l: &mut RawLitellmSettings,
    models: &HashSet<String>,
    source: &str,
) -> Result<RouterSettings, ConfigError> {
    let defaults = RouterSettings::default();
    let error = |entry: &str, message: String, fix: &str| ConfigError::Entry {
        file: source.to_owned(),
        entry: entry.to_owned(),
        message,
        fix: fix.to_owned(),
    };
    let cooldown = match r.cooldown_time.or(l.cooldown_time) {
        None => defaults.cooldown,
        Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(error(
                "router_settings.cooldown_time",
                format!("{s} is not a number of seconds"),
                "write e.g. cooldown_time: 30",
            ));
        }
    };
    let fallbacks = |field: &str, raw: Option<RawFallbacks>| {
        let mut map = HashMap::new();
        for entry in raw.into_iter().flatten() {
            for (from, to) in entry {
                for name in std::iter::once(&from).chain(&to) {
                    let served = models.contains(name)
                        || models.iter().any(|m| {
                            m.strip_suffix('*')
                                .is_some_and(|prefix| name.starts_with(prefix))
                        });
                    if name != "*" && !served {
                        return Err(error(
                            field,
                            format!("{name:?} is not a model_name of model_list"),
                            "name groups the config serves, e.g. [{\"gpt-4o\": [\"gpt-4o-mini\"]}]",
                        ));
                    }
                }
                map.insert(from, to);
            }
        }
        Ok(map)
    };
    let mut fallback_map = fallbacks(
        "router_settings.fallbacks",
        r.fallbacks.or(l.fallbacks.take()),
    )?;
    if let Some(default) = r.default_fallbacks.or(l.default_fallbacks.take()) {
        let star = fallbacks(
            "router_settings.default_fallbacks",
            Some(vec![HashMap::from([("*".to_owned(), default)])]),
        )?;
        fallback_map.extend(star);
    }
    Ok(RouterSettings {
        num_retries: r
            .num_retries
            .or(l.num_retries)
            .unwrap_or(defaults.num_retries),
        allowed_fails: r
            .allowed_fails
            .or(l.allowed_fails)
            .unwrap_or(defaults.allowed_fails),
        cooldown,
        fallbacks: fallback_map,
        context_window_fallbacks: fallbacks(
            "router_settings.context_window_fallbacks",
            r.context_window_fallbacks
                .or(l.context_window_fallbacks.take()),
        )?,
        content_policy_fallbacks: fallbacks(
            "router_settings.content_policy_fallbacks",
            r.content_policy_fallbacks
                .or(l.content_policy_fallbacks.take()),
        )?,
        aliases: {
            let mut aliases = Vec::new();
            for (alias, target) in r.model_group_alias {
                let (group, hidden) = match target {
                    RawAlias::Name(g) => (g, false),
                    RawAlias::Full { model, hidden } => (model, hidden),
                };
                if !models.contains(&group) {
                    return Err(error(
                        "router_settings.model_group_alias",
                        format!(
                            "{alias:?} points to {group:?}, which is not a model_name of model_list"
                        ),
                        "alias an existing group, e.g. {\"gpt-4\": \"gpt-4o\"}",
                    ));
                }
                aliases.push(Alias {
                    alias,
                    group,
                    hidden,
                });
            }
            aliases.sort_by(|a, b| a.alias.cmp(&b.alias));
            aliases
        },
        unsupported_strategy: r.routing_strategy.filter(|s| s != "simple-shuffle"),
    })
}

/// A timeout of [`ServerLimits`], reached from its setting.
type TimeoutField = fn(&mut ServerLimits) -> &mut Duration;

/// The timeout settings: variable, YAML name and the limit each sets.
const TIMEOUT_SETTINGS: [(&str, &str, TimeoutField); 3] = [
    (
        "TALLY_HEADER_READ_TIMEOUT_SECS",
        "header_read_timeout_secs",
        |l| &mut l.header_read_timeout,
    ),
    (
        "TALLY_BODY_READ_TIMEOUT_SECS",
        "body_read_timeout_secs",
        |l| &mut l.body_read_timeout,
    ),
    ("TALLY_IDLE_TIMEOUT_SECS", "idle_timeout_secs", |l| {
        &mut l.idle_timeout
    }),
];

fn positive_secs(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs > 0.0)
        .then(|| Duration::try_from_secs_f64(secs).ok())
        .flatten()
}

/// `tally_settings`' timeouts (seconds, in [`TIMEOUT_SETTINGS`] order) and connection limit.
fn server_limits(
    file: &str,
    timeouts: [Option<f64>; 3],
    max_connections: Option<usize>,
) -> Result<ServerLimits, ConfigError> {
    let mut limits = ServerLimits::default();
    for ((_, name, field), secs) in TIMEOUT_SETTINGS.into_iter().zip(timeouts) {
        let Some(secs) = secs else { continue };
        *field(&mut limits) = positive_secs(secs).ok_or_else(|| ConfigError::Entry {
            file: file.to_owned(),
            entry: format!("tally_settings.{name}"),
            message: format!("{secs} is not a positive number of seconds"),
            fix: format!("write e.g. {name}: 30"),
        })?;
    }
    if let Some(n) = max_connections {
        if n == 0 {
            return Err(ConfigError::Entry {
                file: file.to_owned(),
                entry: "tally_settings.max_connections".into(),
                message: "0 would refuse every connection".into(),
                fix: "write at least 1, e.g. max_connections: 4096".into(),
            });
        }
        limits.max_connections = n;
    }
    Ok(limits)
}

/// A key anyone could guess: a published example, or too short to resist guessing.
pub fn is_weak_master_key(key: &str) -> bool {
    let lower = key.trim().to_ascii_lowercase();
    lower.len() < MIN_MASTER_KEY_LEN || KNOWN_WEAK_MASTER_KEYS.contains(&lower.as_str())
}

/// `os.environ/NAME` → the variable's value; anything else unchanged. `Err(NAME)` when unset.
fn resolve_env_value(value: &str, env: EnvLookup) -> Result<String, String> {
    match value.strip_prefix("os.environ/") {
        Some(var) => env(var).ok_or_else(|| var.to_owned()),
        None => Ok(value.to_owned()),
    }
}

fn parse_env<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse().map_err(|e| ConfigError::Env {
        var: var.to_owned(),
        message: format!("{value:?} is not valid ({e}); write a whole number"),
    })
}

fn parse_bool(var: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError::Env {
            var: var.to_owned(),
            message: format!("{value:?} is not a boolean; write true or false"),
        }),
    }
}

fn yaml_error(file: &str, e: &serde_saphyr::Error) -> ConfigError {
    let at = e
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| format!(" at line {} column {}", l.line(), l.column()))
        .unwrap_or_default();
    // saphyr's Display may render a multi-line snippet; the first line carries the message.
    let message = e.to_string();
    let message = message.lines().next().unwrap_or_default().to_owned();
    ConfigError::Yaml {
        file: file.to_owned(),
        at,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRONG: &str = "sk-0123456789abcdef0123456789abcdef";

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn load(
        text: &str,
        env: &'static [(&'static str, &'static str)],
    ) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::load_from_str(text, "test.yaml", &env_of(env))
    }

    #[test]
    fn reads_the_example_config() {
        let text = include_str!("../../fixtures/config.yaml");
        let config = load(text, &[("LITELLM_MASTER_KEY", STRONG)]).unwrap();
        assert_eq!(config.deployments.len(), 3);
        let gpt = config.deployment("gpt-4o").unwrap();
        assert_eq!(gpt.upstream_model, "gpt-4o");
        assert!(gpt.mock_response.is_some());
        let fake = config.deployment("fake-openai-endpoint").unwrap();
        assert_eq!(
            fake.api_base,
            "https://exampleopenaiendpoint-production.up.railway.app"
        );
        assert_eq!(fake.timeout, Duration::from_secs(30));
        assert_eq!(config.master_key.as_deref(), Some(STRONG));
        assert_eq!(config.settings.spend_log_max_bytes, 104_857_600);
        assert!(config.unsupported_callbacks.is_empty());
    }

    #[test]
    fn tally_env_overrides_the_file() {
        let text = "general_settings: {master_key: sk-0123456789abcdef0123}\ntally_settings: {spend_log: a.jsonl, max_body_bytes: 10}\n";
        let config = load(
            text,
            &[
                ("TALLY_SPEND_LOG", "/x/b.jsonl"),
                ("TALLY_MAX_BODY_BYTES", "99"),
                ("TALLY_PRICE_FILE", "p.json"),
            ],
        )
        .unwrap();
        assert_eq!(config.settings.spend_log, PathBuf::from("/x/b.jsonl"));
        assert_eq!(config.settings.max_body_bytes, 99);
        assert_eq!(config.settings.price_file, Some(PathBuf::from("p.json")));
        let bad = load(text, &[("TALLY_MAX_BODY_BYTES", "lots")]).unwrap_err();
        assert!(bad.to_string().contains("TALLY_MAX_BODY_BYTES"), "{bad}");
    }

    #[test]
    fn server_limits_come_from_the_file_and_the_environment() {
        let base = "general_settings: {master_key: sk-0123456789abcdef0123}\n";
        let defaults = load(base, &[]).unwrap().settings.server;
        assert_eq!(defaults, ServerLimits::default());
        let text = format!(
            "{base}tally_settings: {{header_read_timeout_secs: 0.5, body_read_timeout_secs: 7, idle_timeout_secs: 9, max_connections: 10}}\n"
        );
        let file = load(&text, &[]).unwrap().settings.server;
        assert_eq!(file.header_read_timeout, Duration::from_millis(500));
        assert_eq!(file.body_read_timeout, Duration::from_secs(7));
        assert_eq!(file.idle_timeout, Duration::from_secs(9));
        assert_eq!(file.max_connections, 10);
        let env = load(
            &text,
            &[
                ("TALLY_HEADER_READ_TIMEOUT_SECS", "1"),
                ("TALLY_BODY_READ_TIMEOUT_SECS", "2"),
                ("TALLY_IDLE_TIMEOUT_SECS", "3"),
                ("TALLY_MAX_CONNECTIONS", "4"),
            ],
        )
        .unwrap()
        .settings
        .server;
        assert_eq!(
            (
                env.header_read_timeout,
                env.body_read_timeout,
                env.idle_timeout
            ),
            (
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(3)
            )
        );
        assert_eq!(env.max_connections, 4);
        for (bad, says) in [
            (
                "header_read_timeout_secs: 0",
                "tally_settings.header_read_timeout_secs: 0 is not a positive",
            ),
            (
                "idle_timeout_secs: -1",
                "tally_settings.idle_timeout_secs: -1 is not a positive",
            ),
            (
                "max_connections: 0",
                "tally_settings.max_connections: 0 would refuse",
            ),
        ] {
            let err = load(&format!("{base}tally_settings: {{{bad}}}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
        for (var, value) in [
            ("TALLY_BODY_READ_TIMEOUT_SECS", "soon"),
            ("TALLY_IDLE_TIMEOUT_SECS", "0"),
            ("TALLY_MAX_CONNECTIONS", "0"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(Box::new([(var, value)]));
            let err = load(base, pairs).unwrap_err().to_string();
            assert!(err.contains(var), "{err}");
        }
    }

    #[test]
    fn refuses_missing_and_weak_master_keys_with_the_fix() {
        for text in [
            "model_list: []",
            "general_settings: {master_key: sk-1234}",
            "general_settings: {master_key: short-key}",
        ] {
            let err = load(text, &[]).unwrap_err().to_string();
            assert!(err.contains("openssl rand -hex 24"), "{err}");
            assert!(err.contains("allow_weak_master_key"), "{err}");
        }
        // Explicitly allowed, by the file or by the environment.
        load("general_settings: {master_key: sk-1234}\ntally_settings: {allow_weak_master_key: true}", &[]).unwrap();
        load(
            "general_settings: {master_key: sk-1234}",
            &[("TALLY_ALLOW_WEAK_MASTER_KEY", "true")],
        )
        .unwrap();
        assert!(is_weak_master_key("SK-1234"));
        assert!(!is_weak_master_key(STRONG));
    }

    #[test]
    fn bad_entries_name_the_file_the_entry_and_the_fix() {
        let cases = [
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: openai/a, api_key: k}\n  - model_name: b\n    litellm_params: {model: groq/b, api_key: k}\n  - model_name: x\n    litellm_params: {model: bedrock/claude}\n",
                "model_list[2] (model_name \"x\").litellm_params.model: unknown provider \"bedrock\" in \"bedrock/claude\"; tally supports these providers: openai, groq,",
            ),
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: openai/a, api_key: os.environ/NOPE_NOT_SET}\n",
                "model_list[0] (model_name \"a\").litellm_params.api_key: environment variable NOPE_NOT_SET",
            ),
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: gpt-4o}\n",
                "model_list[0] (model_name \"a\").litellm_params.api_key: no key for openai: litellm_params.api_key is not given and OPENAI_API_KEY is not set; export OPENAI_API_KEY=...",
            ),
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: azure/my-dep, api_key: k}\n",
                "model_list[0] (model_name \"a\").litellm_params.api_base: an Azure deployment needs",
            ),
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: openai/a, api_key: k}\nrouter_settings: {fallbacks: [{a: [b]}]}\n",
                "router_settings.fallbacks: \"b\" is not a model_name of model_list",
            ),
        ];
        for (text, expected) in cases {
            let text = format!("general_settings: {{master_key: {STRONG}}}\n{text}");
            let err = load(&text, &[]).unwrap_err().to_string();
            assert!(err.starts_with("test.yaml: "), "{err}");
            assert!(err.contains(expected), "{err}\n  expected: {expected}");
        }
    }

    #[test]
    fn providers_read_keys_from_the_environment_and_groups_load() {
        let text = format!(
            "general_settings: {{master_key: {STRONG}}}
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/prod-gpt4o, api_base: https://res.openai.azure.com, api_version: \"2024-10-21\", weight: 9}}
    model_info: {{base_model: azure/gpt-4o}}
  - model_name: gpt-4o
    litellm_params: {{model: gpt-4o, weight: 1}}
  - model_name: fast
    litellm_params: {{model: groq/llama-3.1-8b-instant}}
router_settings: {{num_retries: 4, allowed_fails: 1, cooldown_time: 30, fallbacks: [{{gpt-4o: [fast]}}], routing_strategy: usage-based-routing-v2}}
litellm_settings: {{num_retries: 9, context_window_fallbacks: [{{fast: [gpt-4o]}}]}}
"
        );
        let config = load(
            &text,
            &[
                ("AZURE_API_KEY", "az"),
                ("OPENAI_API_KEY", "oa"),
                ("GROQ_API_KEY", "gq"),
            ],
        )
        .unwrap();
        let d = &config.deployments;
        assert_eq!(d.len(), 3);
        assert_eq!(
            (d[0].provider.as_str(), d[0].upstream_model.as_str()),
            ("azure", "prod-gpt4o")
        );
        assert_eq!(d[0].api_key.as_deref(), Some("az"));
        assert_eq!(d[0].api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(d[0].base_model.as_deref(), Some("azure/gpt-4o"));
        assert_eq!(d[0].weight, Some(9.0));
        assert_eq!(
            (d[1].provider.as_str(), d[1].api_key.as_deref()),
            ("openai", Some("oa"))
        );
        assert_eq!(d[1].api_base, OPENAI_API_BASE);
        assert_eq!(d[2].api_base, "https://api.groq.com/openai/v1");
        assert_eq!(d[2].api_key.as_deref(), Some("gq"));
        assert!(
            config.unapplied_params.is_empty(),
            "{:?}",
            config.unapplied_params
        );
        let extra = load(
            &format!("general_settings: {{master_key: {STRONG}}}\nmodel_list:\n  - model_name: a\n    litellm_params: {{model: openai/a, api_key: k, temperature: 0.2, seed: 12}}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            extra.unapplied_params,
            ["model_list[0] (model_name \"a\"): seed, temperature"]
        );
        assert_eq!(config.model_names(), vec!["gpt-4o", "fast"]);
        let r = &config.router;
        assert_eq!(
            r.num_retries, 4,
            "router_settings wins over litellm_settings"
        );
        assert_eq!((r.allowed_fails, r.cooldown), (1, Duration::from_secs(30)));
        assert_eq!(r.fallbacks_of("gpt-4o"), ["fast".to_owned()]);
        assert_eq!(r.context_window_fallbacks_of("fast"), ["gpt-4o".to_owned()]);
        assert_eq!(
            r.unsupported_strategy.as_deref(),
            Some("usage-based-routing-v2")
        );
        let timeouts = load(
            &format!("general_settings: {{master_key: {STRONG}}}\nmodel_list:\n  - model_name: a\n    litellm_params: {{model: openai/a, api_key: k}}\n  - model_name: b\n    litellm_params: {{model: openai/b, api_key: k, timeout: 5}}\nlitellm_settings: {{request_timeout: 10}}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(timeouts.deployments[0].timeout, Duration::from_secs(10));
        assert_eq!(timeouts.deployments[1].timeout, Duration::from_secs(5));
        let defaults = load(&format!("general_settings: {{master_key: {STRONG}}}"), &[]).unwrap();
        assert_eq!(defaults.router, RouterSettings::default());
        assert_eq!(defaults.router.num_retries, 2);
    }

    #[test]
    fn invalid_yaml_reports_line_and_column() {
        let err = load("model_list:\n  - model_name: a\n   bad: [unclosed\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ConfigError::Yaml { .. }), "{text}");
        assert!(text.contains("test.yaml: invalid YAML at line"), "{text}");
    }

    #[test]
    fn litellm_params_price_names_are_kept_and_bad_values_named() {
        let config = load(
            &format!(
                "general_settings: {{master_key: {STRONG}}}\nmodel_list:\n  - model_name: a\n    litellm_params: {{model: openai/x, api_key: k, input_cost_per_token: 0.000001, cache_read_input_token_cost: \"1e-7\", input_cost_per_token_above_200k_tokens: 0.000002, output_cost_per_reasoning_token: 0.00001, rpm: 100}}"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            config.deployments[0].prices.names(),
            [
                "cache_read_input_token_cost",
                "input_cost_per_token",
                "input_cost_per_token_above_200k_tokens",
                "output_cost_per_reasoning_token"
            ]
        );
        // Read as prices, so not named in the "not applied" warning.
        assert!(
            config.unapplied_params.is_empty(),
            "{:?}",
            config.unapplied_params
        );
        for bad in ["-0.1", "\"cheap\"", "[1]"] {
            let err = load(
                &format!(
                    "general_settings: {{master_key: {STRONG}}}\nmodel_list:\n  - model_name: a\n    litellm_params: {{model: openai/x, api_key: k, cache_creation_input_token_cost: {bad}}}"
                ),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("litellm_params.cache_creation_input_token_cost"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unknown_tally_setting_is_refused() {
        let err = load("tally_settings: {spend_logg: x}", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("spend_logg"), "{err}");
    }

    #[test]
    fn other_callbacks_are_collected_for_a_warning() {
        let config = load(
            &format!("general_settings: {{master_key: {STRONG}}}\nlitellm_settings: {{callbacks: [lago, langfuse]}}"),
            &[],
        )
        .unwrap();
        assert_eq!(config.unsupported_callbacks, vec!["langfuse".to_owned()]);
    }

    #[test]
    fn database_url_from_config_env_reference_or_database_url() {
        let base = format!("general_settings: {{master_key: {STRONG}");
        const PG: &str = "postgresql://u:p@db:5432/keys";
        let pg = PG;
        let config = load(&format!("{base}, database_url: {pg}}}"), &[]).unwrap();
        assert_eq!(config.database_url.as_deref(), Some(pg));
        assert!(
            !format!("{config:?}").contains("u:p@"),
            "the URL holds a password"
        );
        let config = load(
            &format!("{base}, database_url: os.environ/KEYS_DB}}"),
            &[("KEYS_DB", "postgres://x@h/d")],
        )
        .unwrap();
        assert_eq!(config.database_url.as_deref(), Some("postgres://x@h/d"));
        let config = load(&format!("{base}}}"), &[("DATABASE_URL", PG)]).unwrap();
        assert_eq!(config.database_url.as_deref(), Some(pg));
        assert_eq!(load(&format!("{base}}}"), &[]).unwrap().database_url, None);
        let err = load(&format!("{base}, database_url: os.environ/NOPE}}"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("os.environ/NOPE"), "{err}");
        let err = load(&format!("{base}, database_url: mysql://h/d}}"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres://"), "{err}");
    }

    #[test]
    fn key_cache_bounds_are_positive_seconds() {
        let base = format!("general_settings: {{master_key: {STRONG}}}\n");
        let config = load(
            &format!(
                "{base}tally_settings: {{key_revalidate_secs: 0.5, key_outage_grace_secs: 60}}"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.settings.key_revalidate, Duration::from_millis(500));
        assert_eq!(config.settings.key_outage_grace, Duration::from_secs(60));
        let defaults = load(&base, &[]).unwrap().settings;
        assert_eq!(defaults.key_revalidate, Duration::from_secs(4));
        let err = load(
            &format!("{base}tally_settings: {{key_revalidate_secs: 0}}"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key_revalidate_secs"), "{err}");
    }
}
