//! Validated shipper settings: everything `tally ship` needs, checked once at start-up.
//!
//! `crate::commands::settings` turns the raw command line / environment into these typed
//! settings, or a [`SettingsError`] that names the variable, what was wrong and what is accepted.
//! [`ShipSettings::new`] builds them in code (the demo, tests) with the same defaults as the CLI.
//! The Lago API key is held in an [`ApiKey`], whose `Debug` and `Display` never show it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::ship::amount::Markup;
use crate::ship::resolve::{ChargeBy, ChargeByError, EventSpec};

/// Lago's own cap on events per batch request (`LAGO_EVENTS_BATCH_MAX_LENGTH`, default 100).
pub const MAX_BATCH_SIZE: usize = 100;
/// Default byte cap of a batch request: well under the 1 MiB body limit of nginx's default
/// (`client_max_body_size`), which fronts many Lago installs.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 512 * 1024;

/// The shipper's tuning defaults, in the units of the command line. The CLI (`default_value_t`)
/// and [`Tuning::default`] both read them, so a default is written once.
pub mod defaults {
    pub const BATCH_SIZE: usize = super::MAX_BATCH_SIZE;
    pub const LINGER_MS: u64 = 20;
    pub const BATCHES_IN_FLIGHT: usize = 4;
    pub const RETRY_CAP_SECS: u64 = 60;
    pub const REQUEST_TIMEOUT_SECS: u64 = 30;
    pub const DRAIN_DEADLINE_SECS: u64 = 10;
    pub const POLL_INTERVAL_MS: u64 = 1000;
    pub const MAX_LINE_BYTES: usize = 1024 * 1024;
    pub const BATCH_MAX_BYTES: usize = super::DEFAULT_BATCH_MAX_BYTES;
    /// 0 = keep acked transaction ids forever.
    pub const ACKED_RETENTION_DAYS: u64 = 0;
    /// `LAGO_API_CHARGE_BY`.
    pub const CHARGE_BY: &str = "end_user_id";
    /// `TALLY_COST_MARKUP`: the provider's price.
    pub const COST_MARKUP: &str = "1";
}

/// What the command line accepts for each tuning setting, in the units of [`defaults`]: clap
/// refuses a value outside its range (src/cli.rs).
pub mod accepted {
    use std::ops::RangeInclusive;

    /// Lago refuses larger batches.
    pub const BATCH_SIZE: RangeInclusive<u64> = 1..=super::MAX_BATCH_SIZE as u64;
    pub const LINGER_MS: RangeInclusive<u64> = 0..=60_000;
    pub const BATCHES_IN_FLIGHT: RangeInclusive<u64> = 1..=256;
    pub const RETRY_CAP_SECS: RangeInclusive<u64> = 1..=86_400;
    pub const REQUEST_TIMEOUT_SECS: RangeInclusive<u64> = 1..=3_600;
    pub const DRAIN_DEADLINE_SECS: RangeInclusive<u64> = 0..=3_600;
    pub const POLL_INTERVAL_MS: RangeInclusive<u64> = 10..=3_600_000;
    pub const MAX_LINE_BYTES: RangeInclusive<u64> = 1024..=64 * 1024 * 1024;
    pub const BATCH_MAX_BYTES: RangeInclusive<u64> = 1024..=64 * 1024 * 1024;
    /// 0 keeps acked ids forever.
    pub const ACKED_RETENTION_DAYS: RangeInclusive<u64> = 0..=36_500;
}

/// The Lago API key. Its value is reachable only through [`ApiKey::expose`]; `Debug` and `Display`
/// print a placeholder, so the key cannot leak through a log line, an error or a `{:?}` of the
/// settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where and how to reach Lago, and how records become events.
#[derive(Debug, Clone)]
pub struct LagoSettings {
    /// Base URL without `/api/v1` and without a trailing slash, e.g. `https://api.getlago.com`.
    pub api_base: Url,
    pub api_key: ApiKey,
    /// What every event is built with: metric code, who is charged, the precise amount.
    pub spec: EventSpec,
}

impl LagoSettings {
    /// `POST` target for batches.
    pub fn batch_url(&self) -> String {
        format!(
            "{}/api/v1/events/batch",
            self.api_base.as_str().trim_end_matches('/')
        )
    }
}

/// Shipper tuning, with units attached.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Events per batch request, 1..=100.
    pub batch_size: usize,
    /// How long a partial batch waits to fill before it is sent anyway.
    pub linger: Duration,
    /// Batch requests in flight at once (≥ 1).
    pub batches_in_flight: usize,
    /// Longest wait between two retries of a failing request.
    pub retry_cap: Duration,
    /// Timeout of one Lago request.
    pub request_timeout: Duration,
    /// On shutdown, how long in-flight requests may still take.
    pub drain_deadline: Duration,
    /// Safety-net poll of the spend log.
    pub poll_interval: Duration,
    /// Longest accepted spend-log line.
    pub max_line_bytes: usize,
    /// Largest request body a batch is built to (an event larger than this goes alone).
    pub batch_max_bytes: usize,
    /// How long acked transaction ids are kept; `None` = forever (the default).
    pub acked_retention: Option<Duration>,
}

impl Default for Tuning {
    /// The same defaults as the command line.
    fn default() -> Self {
        Self {
            batch_size: defaults::BATCH_SIZE,
            linger: Duration::from_millis(defaults::LINGER_MS),
            batches_in_flight: defaults::BATCHES_IN_FLIGHT,
            retry_cap: Duration::from_secs(defaults::RETRY_CAP_SECS),
            request_timeout: Duration::from_secs(defaults::REQUEST_TIMEOUT_SECS),
            drain_deadline: Duration::from_secs(defaults::DRAIN_DEADLINE_SECS),
            poll_interval: Duration::from_millis(defaults::POLL_INTERVAL_MS),
            max_line_bytes: defaults::MAX_LINE_BYTES,
            batch_max_bytes: defaults::BATCH_MAX_BYTES,
            acked_retention: None,
        }
    }
}

/// Everything `tally ship` runs with, validated.
#[derive(Debug, Clone)]
pub struct ShipSettings {
    pub spend_log: PathBuf,
    pub state_dir: PathBuf,
    pub lago: LagoSettings,
    pub tuning: Tuning,
    pub metrics_addr: Option<SocketAddr>,
    /// `--webhook-addr`: receive Lago's webhooks there (off when `None`).
    pub webhook: Option<crate::ship::webhook::WebhookSettings>,
}

/// A setting that cannot be used. Each variant names the environment variable (the flag has the
/// same name in kebab case) and says what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{var} is not set; {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var}={value:?} is not valid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// Like `Invalid`, for a secret: the value is not repeated.
    #[error("{var} is not valid: {reason}")]
    InvalidSecret { var: &'static str, reason: String },
}

impl ShipSettings {
    /// Settings built in code, with the command line's defaults for everything else.
    pub fn new(
        spend_log: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        api_base: &str,
        api_key: ApiKey,
        event_code: &str,
    ) -> Result<Self, SettingsError> {
        Ok(Self {
            spend_log: spend_log.into(),
            state_dir: state_dir.into(),
            lago: LagoSettings {
                api_base: parse_api_base(api_base)?,
                api_key: check_api_key(api_key.expose())?,
                spec: EventSpec {
                    code: check_event_code(event_code)?,
                    charge_by: ChargeBy::default(),
                    precise_amount: None,
                },
            },
            tuning: Tuning::default(),
            metrics_addr: None,
            webhook: None,
        })
    }

    /// `shipper.db` in the state directory.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join(crate::ship::outbox::DB_FILE)
    }
}

/// The command-line values an [`EventSpec`] is built from. `tally ship` and `tally replay` take
/// them from `LagoArgs`; `tally queue retry` has its own flags for the same variables.
#[derive(Debug, Clone, Copy)]
pub struct EventArgs<'a> {
    /// `LAGO_API_EVENT_CODE`.
    pub code: Option<&'a str>,
    /// `LAGO_API_CHARGE_BY`.
    pub charge_by: &'a str,
    /// `TALLY_PRECISE_AMOUNT`.
    pub precise_amount: bool,
    /// `TALLY_COST_MARKUP`.
    pub cost_markup: &'a str,
}

/// The one way from the Lago arguments to the event spec, for every command that builds events
/// (`ship`, `replay`, `queue retry`): the same checks, so none writes an event another refuses.
/// `missing_code` is the hint when `LAGO_API_EVENT_CODE` is not set (what the command needs it for).
pub fn event_spec(
    args: &EventArgs<'_>,
    missing_code: &'static str,
) -> Result<EventSpec, SettingsError> {
    let code = args.code.ok_or(SettingsError::Missing {
        var: "LAGO_API_EVENT_CODE",
        hint: missing_code,
    })?;
    let charge_by = args
        .charge_by
        .parse::<ChargeBy>()
        .map_err(|e: ChargeByError| invalid("LAGO_API_CHARGE_BY", args.charge_by, e.to_string()))?;
    Ok(EventSpec {
        code: check_event_code(code)?,
        charge_by,
        precise_amount: precise_amount(args.precise_amount, args.cost_markup)?,
    })
}

/// `TALLY_PRECISE_AMOUNT` and `TALLY_COST_MARKUP` (the markup is checked even while the amount
/// is off, so a typo shows at start-up, not when it is switched on).
pub fn precise_amount(on: bool, cost_markup: &str) -> Result<Option<Markup>, SettingsError> {
    let markup: Markup = cost_markup
        .parse()
        .map_err(|e: crate::ship::amount::MarkupError| {
            invalid("TALLY_COST_MARKUP", cost_markup, e.to_string())
        })?;
    Ok(on.then_some(markup))
}

pub(crate) fn invalid(var: &'static str, value: &str, reason: String) -> SettingsError {
    SettingsError::Invalid {
        var,
        value: value.to_owned(),
        reason,
    }
}

/// A URL as it may be shown: any user name and password replaced by `<redacted>`.
pub fn redact_url(url: &Url) -> String {
    redact_url_text(url.as_str())
}

/// Like [`redact_url`], for text that may not even parse as a URL (a bad `LAGO_API_BASE` is
/// echoed in its error): whatever stands before the last `@` of the authority is a credential.
pub fn redact_url_text(raw: &str) -> String {
    let (scheme, rest) = match raw.find("://") {
        Some(i) => raw.split_at(i + 3),
        None => ("", raw),
    };
    // Without `://` nothing says where the host starts: anything before an `@` may be a secret.
    let authority_end = if scheme.is_empty() {
        rest.len()
    } else {
        rest.find(['/', '?', '#']).unwrap_or(rest.len())
    };
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}<redacted>{}", &rest[at..]),
        None => raw.to_owned(),
    }
}

pub(crate) fn parse_api_base(raw: &str) -> Result<Url, SettingsError> {
    // The value is echoed in every error below: never with the password it may carry.
    let shown = redact_url_text(raw.trim());
    let bad = |reason: String| invalid("LAGO_API_BASE", &shown, reason);
    let url = Url::parse(raw.trim()).map_err(|e| {
        bad(format!(
            "{e}; expected an http(s) URL such as https://api.getlago.com"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not supported; accepted: http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "credentials in the URL are not accepted; put the key in LAGO_API_KEY".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a query string or fragment is not accepted".into()));
    }
    let path = url.path().trim_end_matches('/');
    if path.ends_with("/api/v1") || path.ends_with("/api/v1/events") {
        return Err(bad(
            "give the base URL without /api/v1 (tally appends /api/v1/events/batch)".into(),
        ));
    }
    Ok(url)
}

pub(crate) fn check_api_key(key: &str) -> Result<ApiKey, SettingsError> {
    let reason = if key.is_empty() {
        Some("it is empty; set it to a Lago API key with write access")
    } else if key.trim() != key {
        Some("it has leading or trailing whitespace; remove it")
    } else if key.chars().any(|c| c.is_control() || !c.is_ascii()) {
        Some("it contains control or non-ASCII characters, which cannot go in an HTTP header")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SettingsError::InvalidSecret {
            var: "LAGO_API_KEY",
            reason: reason.into(),
        }),
        None => Ok(ApiKey::new(key)),
    }
}

pub(crate) fn check_event_code(code: &str) -> Result<String, SettingsError> {
    if code.trim().is_empty() {
        return Err(invalid(
            "LAGO_API_EVENT_CODE",
            code,
            "it is empty; set it to the code of your Lago billable metric".into(),
        ));
    }
    if code.trim() != code {
        return Err(invalid(
            "LAGO_API_EVENT_CODE",
            code,
            "it has leading or trailing whitespace; Lago matches codes exactly".into(),
        ));
    }
    Ok(code.to_owned())
}
