//! From the command line to the services' settings: the only place that knows both the clap
//! types of src/cli.rs and the settings the services take, so no service imports the CLI.
//! Every check names the variable, what was wrong and what is accepted ([`SettingsError`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::cli::{LagoArgs, LagoEmulatorArgs, ProxyArgs, ShipArgs, ShipTuning};
use crate::lago_emulator::{DEFAULT_BATCH_MAX_LENGTH, EmulatorConfig, WebhookConfig};
use crate::proxy::ProxyConfig;
use crate::ship::amount::Markup;
use crate::ship::settings::{
    self, ApiKey, EventArgs, LagoSettings, SettingsError, ShipSettings, Tuning, check_api_key,
    event_spec, invalid, parse_api_base,
};

/// `tally ship`'s command line / environment, validated. The first problem found is returned.
pub fn ship(args: &ShipArgs) -> Result<ShipSettings, SettingsError> {
    let lago = lago(&args.lago)?;
    let tuning = tuning(&args.tuning);
    if args.shared.spend_log.as_os_str().is_empty() {
        return Err(invalid(
            "TALLY_SPEND_LOG",
            "",
            "give the path of the live spend log".into(),
        ));
    }
    if args.shared.state_dir.as_os_str().is_empty() {
        return Err(invalid(
            "TALLY_STATE_DIR",
            "",
            "give a directory for shipper.db".into(),
        ));
    }
    Ok(ShipSettings {
        spend_log: args.shared.spend_log.clone(),
        state_dir: args.shared.state_dir.clone(),
        lago,
        tuning,
        metrics_addr: args.metrics_addr,
        webhook: args
            .webhook_addr
            .map(|addr| crate::ship::webhook::WebhookSettings {
                addr,
                // An empty key would let anyone sign: as good as none (hmac refused).
                hmac_key: args
                    .lago_webhook_hmac_key
                    .clone()
                    .filter(|k| !k.trim().is_empty())
                    .map(ApiKey::new),
                listener: None,
            }),
    })
}

/// Validates only the Lago part (also used by `tally replay --ship`).
pub fn lago(args: &LagoArgs) -> Result<LagoSettings, SettingsError> {
    let base = args.lago_api_base.as_deref().ok_or(SettingsError::Missing {
        var: "LAGO_API_BASE",
        hint: "set it to the Lago API's base URL, e.g. https://api.getlago.com or http://127.0.0.1:3000",
    })?;
    let key = args.lago_api_key.as_deref().ok_or(SettingsError::Missing {
        var: "LAGO_API_KEY",
        hint: "set it to a Lago API key with write access (Lago: Developers → API keys)",
    })?;
    Ok(LagoSettings {
        api_base: parse_api_base(base)?,
        api_key: check_api_key(key)?,
        spec: event_spec(
            &EventArgs::from(args),
            "set it to the code of the Lago billable metric the events feed",
        )?,
    })
}

impl<'a> From<&'a LagoArgs> for EventArgs<'a> {
    fn from(args: &'a LagoArgs) -> Self {
        Self {
            code: args.lago_api_event_code.as_deref(),
            charge_by: &args.lago_api_charge_by,
            precise_amount: args.precise_amount,
            cost_markup: &args.cost_markup,
        }
    }
}

/// `TALLY_PRECISE_AMOUNT` and `TALLY_COST_MARKUP` (the markup is checked even while the amount
/// is off, so a typo shows at start-up, not when it is switched on).
pub fn precise_amount(args: &LagoArgs) -> Result<Option<Markup>, SettingsError> {
    settings::precise_amount(args.precise_amount, &args.cost_markup)
}

/// The tuning flags as the shipper's [`Tuning`]. Their ranges were checked by clap when the
/// command line was parsed (src/cli.rs, [`crate::ship::settings::accepted`]).
pub fn tuning(t: &ShipTuning) -> Tuning {
    Tuning {
        batch_size: t.batch_size,
        linger: Duration::from_millis(t.linger_ms),
        batches_in_flight: t.batches_in_flight,
        retry_cap: Duration::from_secs(t.retry_cap_secs),
        request_timeout: Duration::from_secs(t.request_timeout_secs),
        drain_deadline: Duration::from_secs(t.drain_deadline_secs),
        poll_interval: Duration::from_millis(t.poll_interval_ms),
        max_line_bytes: t.max_line_bytes,
        batch_max_bytes: t.batch_max_bytes,
        acked_retention: (t.acked_retention_days > 0)
            .then(|| Duration::from_secs(t.acked_retention_days * 86_400)),
    }
}

/// `tally proxy`'s command line: the config file with the command line's overrides, and the
/// address to listen on (`host:port`).
pub fn proxy(args: ProxyArgs) -> anyhow::Result<(ProxyConfig, String)> {
    let mut config = ProxyConfig::load(&args.config)?;
    if let Some(path) = args.spend_log {
        config = config.with_spend_log(path);
    }
    if let Some(path) = args.state_dir {
        config = config.with_state_dir(path);
    }
    Ok((config, format!("{}:{}", args.host, args.port)))
}

/// `tally lago-emulator`'s command line: the emulator's config and the address to serve on.
pub async fn lago_emulator(args: LagoEmulatorArgs) -> anyhow::Result<(EmulatorConfig, SocketAddr)> {
    let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("resolving --host {}", args.host))?
        .next()
        .with_context(|| format!("--host {} resolves to no address", args.host))?;
    // Not a clap range: clap would name u64::MAX as the bound of an open range.
    if args.batch_max_length == 0 {
        anyhow::bail!(
            "--batch-max-length must be at least 1 (Lago's default is {DEFAULT_BATCH_MAX_LENGTH})"
        );
    }
    let config = EmulatorConfig {
        api_key: args.api_key,
        read_only_api_key: args.read_only_api_key,
        batch_max_length: args.batch_max_length,
        store: args.store,
        known_subscriptions: (!args.known_subscriptions.is_empty())
            .then(|| args.known_subscriptions.iter().cloned().collect()),
        metrics: args.metrics,
        webhook: args.webhook_url.map(|url| WebhookConfig {
            url,
            jwt: args.webhook_hmac_key.is_none(),
            hmac_key: args.webhook_hmac_key,
        }),
    };
    Ok((config, addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::ship::settings::redact_url_text;
    use clap::Parser;

    fn args(extra: &[&str]) -> ShipArgs {
        let mut pairs = vec![
            ("--lago-api-base", "http://127.0.0.1:3000"),
            ("--lago-api-key", "sekret-key-1"),
            ("--lago-api-event-code", "llm_usage"),
        ];
        for kv in extra.chunks(2) {
            pairs.retain(|(k, _)| *k != kv[0]);
            pairs.push((kv[0], kv[1]));
        }
        let mut argv = vec!["tally", "ship"];
        for (k, v) in pairs {
            argv.extend([k, v]);
        }
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Ship(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_validate() {
        let s = ship(&args(&[])).unwrap();
        assert_eq!(s.tuning.batch_size, 100);
        assert_eq!(
            s.lago.batch_url(),
            "http://127.0.0.1:3000/api/v1/events/batch"
        );
        assert_eq!(s.tuning.acked_retention, None);
    }

    #[test]
    fn key_never_shows_in_debug_or_errors() {
        let s = ship(&args(&[])).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("sekret-key-1"), "{dbg}");
        assert!(dbg.contains("redacted"));
        let mut a = args(&[]);
        a.lago.lago_api_key = Some(" sekret-key-1".into());
        let err = ship(&a).unwrap_err().to_string();
        assert!(err.contains("LAGO_API_KEY"), "{err}");
        assert!(!err.contains("sekret"), "{err}");
    }

    #[test]
    fn errors_name_the_variable_and_accepted_values() {
        let cases: &[(&[&str], &str, &str)] = &[
            (
                &["--lago-api-charge-by", "customer"],
                "LAGO_API_CHARGE_BY",
                "end_user_id, user_id, team_id",
            ),
            (
                &["--lago-api-base", "ftp://x"],
                "LAGO_API_BASE",
                "http or https",
            ),
            (
                &["--lago-api-base", "not a url"],
                "LAGO_API_BASE",
                "https://api.getlago.com",
            ),
            (
                &["--lago-api-base", "https://api.getlago.com/api/v1/"],
                "LAGO_API_BASE",
                "without /api/v1",
            ),
            (
                &["--lago-api-event-code", ""],
                "LAGO_API_EVENT_CODE",
                "empty",
            ),
        ];
        for (extra, var, accepted) in cases {
            let err = ship(&args(extra)).unwrap_err().to_string();
            assert!(err.contains(var), "{extra:?}: {err}");
            assert!(err.contains(accepted), "{extra:?}: {err}");
        }
    }

    #[test]
    fn missing_required_settings_are_named() {
        let mut a = args(&[]);
        a.lago.lago_api_key = None;
        let err = ship(&a).unwrap_err().to_string();
        assert!(err.starts_with("LAGO_API_KEY is not set"), "{err}");
        let mut a = args(&[]);
        a.lago.lago_api_event_code = None;
        let err = ship(&a).unwrap_err().to_string();
        assert!(err.starts_with("LAGO_API_EVENT_CODE is not set"), "{err}");
        let mut a = args(&[]);
        a.lago.lago_api_base = None;
        let err = ship(&a).unwrap_err().to_string();
        assert!(err.starts_with("LAGO_API_BASE is not set"), "{err}");
    }

    /// Regression (docs/reliability.md, "Findings"): a `LAGO_API_BASE` with a password was echoed
    /// in the start-up error that refused it.
    #[test]
    fn a_password_in_lago_api_base_is_never_echoed() {
        for base in [
            "https://user:hunter2-pass@lago.example.com",
            "https://hunter2-pass@lago.example.com/x",
            "https://user:hunter2-pass@lago.example.com/api/v1",
            "htps//user:hunter2-pass@lago example.com",
        ] {
            let err = ship(&args(&["--lago-api-base", base]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("LAGO_API_BASE"), "{err}");
            assert!(!err.contains("hunter2"), "{base}: {err}");
        }
        let err = ship(&args(&[
            "--lago-api-base",
            "https://user:hunter2-pass@lago.example.com",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("<redacted>@lago.example.com"), "{err}");
        assert!(err.contains("credentials in the URL"), "{err}");
        assert_eq!(
            redact_url_text("http://a.b/c@d"),
            "http://a.b/c@d",
            "an @ after the host is not a credential"
        );
    }

    #[test]
    fn batch_max_bytes_defaults_under_nginx_limit() {
        let s = ship(&args(&[])).unwrap();
        assert_eq!(s.tuning.batch_max_bytes, 512 * 1024);
        let s = ship(&args(&["--batch-max-bytes", "4096"])).unwrap();
        assert_eq!(s.tuning.batch_max_bytes, 4096);
    }

    #[test]
    fn precise_amount_is_off_by_default_and_the_markup_is_checked() {
        let s = ship(&args(&[])).unwrap();
        assert_eq!(s.lago.spec.precise_amount, None);
        let s = ship(&args(&[
            "--precise-amount",
            "true",
            "--cost-markup",
            "1.25",
        ]))
        .unwrap();
        assert_eq!(
            s.lago.spec.precise_amount.map(|m| m.to_string()),
            Some("1.25".into())
        );
        let s = ship(&args(&["--precise-amount", "true"])).unwrap();
        assert_eq!(s.lago.spec.precise_amount, Some(Markup::default()));
        for bad in ["-0.5", "inf", "NaN", "1e3", "abc"] {
            let err = ship(&args(&["--cost-markup", bad]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("TALLY_COST_MARKUP="), "{bad}: {err}");
        }
        let err = ship(&args(&["--cost-markup", "-2"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("below 0"), "{err}");
    }

    #[test]
    fn retention_days_become_a_duration() {
        let s = ship(&args(&["--acked-retention-days", "2"])).unwrap();
        assert_eq!(
            s.tuning.acked_retention,
            Some(Duration::from_secs(2 * 86_400))
        );
    }
}
