//! Command-line definitions (clap derive). No I/O here: `main.rs` parses, the library acts.
//!
//! Every setting is also an environment variable, so the systemd units can share one
//! `EnvironmentFile`. Secrets (`LAGO_API_KEY`) never have their values shown in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::logging::LogFormat;
use crate::ship::settings::accepted as ship_accepted;
use crate::ship::settings::defaults as ship_defaults;

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Bill LLM usage to Lago, exactly once"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// For anything a script might read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the OpenAI-compatible proxy that writes the spend log.
    Proxy(ProxyArgs),
    /// Run the shipper: tail the spend log and deliver usage events to Lago.
    Ship(ShipArgs),
    /// Feed historical spend logs through the shipper's dedupe and outbox.
    Replay(ReplayArgs),
    /// Inspect and act on pending, held, dead and rejected items.
    Queue(QueueArgs),
    /// Run the whole pipeline on loopback with a mock model and a local Lago.
    Demo(DemoArgs),
    /// Run a local Lago events API that answers like the real server.
    LagoEmulator(LagoEmulatorArgs),
    /// Check acked events against Lago: present, same code, subscription and timestamp; and
    /// every subscription known. Exits 3 when something is missing, different or unbillable.
    Audit(AuditArgs),
    /// Manage the proxy's virtual keys (in SQLite or PostgreSQL, as the config says).
    Keys(KeysArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Only events recorded at or after this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events recorded before this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub until: Option<String>,
    /// Check this many events picked at random instead of all.
    #[arg(long)]
    pub sample: Option<u64>,
    /// Requests per second to Lago (well under Lago Cloud's limits); 429s are waited out.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Put events Lago does not have back to pending, so `tally ship` sends them again.
    #[arg(long)]
    pub fix: bool,
    /// `json` for scripts: stable field names.
    #[arg(long, value_enum, default_value_t)]
    pub output_format: OutputFormat,
    #[command(flatten)]
    pub shared: SharedArgs,
    #[command(flatten)]
    pub lago: LagoArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,

    /// The proxy's config.yaml: names the key store (general_settings.database_url, or the
    /// state dir's keys.db).
    #[arg(long, short = 'c', global = true, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,

    /// `json` for scripts: stable field names.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub output_format: OutputFormat,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysAction {
    /// List keys, newest first (tokens and settings; never the keys themselves).
    List {
        #[arg(long, default_value_t = 1)]
        page: u64,
        #[arg(long, default_value_t = 100)]
        size: u64,
    },
    /// Create a key; prints it once.
    Create {
        /// A chosen key (`sk-...`); random when absent.
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        key_alias: Option<String>,
        #[arg(long)]
        user_id: Option<String>,
        #[arg(long)]
        team_id: Option<String>,
        /// Models the key may use (repeat or comma-separate); all when absent.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Lifetime, e.g. 30d; no expiry when absent.
        #[arg(long)]
        duration: Option<String>,
    },
    /// Delete keys (the key or its token).
    Delete {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Import LiteLLM's keys from its "LiteLLM_VerificationToken" table; idempotent.
    Import {
        /// LiteLLM's DATABASE_URL (postgresql://...).
        #[arg(long, required_unless_present = "from", conflicts_with = "from")]
        litellm_database_url: Option<String>,
        /// A JSON-lines export of the table, one row per line.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

/// Where the spend log and local state live; both services must agree on these.
#[derive(Debug, Clone, Args)]
pub struct SharedArgs {
    /// Path of the live spend log (JSON lines).
    #[arg(long, env = "TALLY_SPEND_LOG", default_value = crate::spend::DEFAULT_SPEND_LOG)]
    pub spend_log: PathBuf,

    /// Directory for local state (`keys.db` for the proxy, `shipper.db` for the shipper).
    #[arg(long, env = "TALLY_STATE_DIR", default_value = crate::spend::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// LiteLLM-style config.yaml.
    #[arg(long, short = 'c', env = "TALLY_CONFIG")]
    pub config: PathBuf,

    #[arg(long, env = "TALLY_HOST", default_value = "0.0.0.0")]
    pub host: String,

    #[arg(long, env = "TALLY_PORT", default_value_t = 4000)]
    pub port: u16,

    /// Overrides `tally_settings.spend_log` in the config.
    #[arg(long, env = "TALLY_SPEND_LOG")]
    pub spend_log: Option<PathBuf>,

    /// Overrides `tally_settings.state_dir` in the config.
    #[arg(long, env = "TALLY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// The Lago connection, named as in LiteLLM's docs.
#[derive(Debug, Clone, Args)]
pub struct LagoArgs {
    /// Base URL of the Lago API, e.g. https://api.getlago.com (without /api/v1).
    #[arg(long, env = "LAGO_API_BASE")]
    pub lago_api_base: Option<String>,

    /// Lago API key (never printed).
    #[arg(long, env = "LAGO_API_KEY", hide_env_values = true)]
    pub lago_api_key: Option<String>,

    /// Code of the Lago billable metric the events feed.
    #[arg(long, env = "LAGO_API_EVENT_CODE")]
    pub lago_api_event_code: Option<String>,

    /// Who is charged: end_user_id, user_id or team_id, or a comma-separated fallback list
    /// such as `team_id,user_id` (the first non-empty id wins).
    #[arg(long, env = "LAGO_API_CHARGE_BY", default_value = ship_defaults::CHARGE_BY)]
    pub lago_api_charge_by: String,

    /// Send `precise_total_amount_cents` (cost × 100 × TALLY_COST_MARKUP, exact decimal) with
    /// every priced event, for a Lago charge with the `dynamic` model.
    #[arg(
        long,
        env = "TALLY_PRECISE_AMOUNT",
        value_parser = clap::builder::BoolishValueParser::new(),
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub precise_amount: bool,

    /// What every cost is multiplied by in `precise_total_amount_cents` (a plain decimal ≥ 0;
    /// 1 = the provider's price, 1.2 = 20% on top).
    #[arg(
        long,
        env = "TALLY_COST_MARKUP",
        default_value = ship_defaults::COST_MARKUP,
        allow_hyphen_values = true
    )]
    pub cost_markup: String,
}

/// A whole number clap accepts only within `range`: a value out of it is refused at parsing,
/// naming the range and both ways of setting it, since a service sets it through the variable
/// (`--batch-size <BATCH_SIZE>': 0 is not in 1..=100; set --batch-size or TALLY_BATCH_SIZE
/// within it`).
fn in_range<T>(
    range: std::ops::RangeInclusive<u64>,
    flag: &'static str,
    env: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    move |text: &str| {
        let refused = |what: String| {
            format!(
                "{what}; set {flag} or {env} within {}..={}",
                range.start(),
                range.end()
            )
        };
        let n: u64 = text
            .trim()
            .parse()
            .map_err(|_| refused(format!("{text:?} is not a whole number")))?;
        if !range.contains(&n) {
            return Err(refused(format!(
                "{n} is not in {}..={}",
                range.start(),
                range.end()
            )));
        }
        T::try_from(n).map_err(|_| refused(format!("{n} is too large for this machine")))
    }
}

/// Shipper tuning; defaults suit a real Lago, and clap checks each is in its accepted range
/// ([`crate::ship::settings::accepted`]).
#[derive(Debug, Clone, Args)]
pub struct ShipTuning {
    /// Events per Lago batch request (1..=100; Lago's cap is 100).
    #[arg(
        long,
        env = "TALLY_BATCH_SIZE",
        default_value_t = ship_defaults::BATCH_SIZE,
        value_parser = in_range::<usize>(ship_accepted::BATCH_SIZE, "--batch-size", "TALLY_BATCH_SIZE")
    )]
    pub batch_size: usize,

    /// How long to wait for a batch to fill before sending it anyway, in milliseconds.
    #[arg(
        long,
        env = "TALLY_LINGER_MS",
        default_value_t = ship_defaults::LINGER_MS,
        value_parser = in_range::<u64>(ship_accepted::LINGER_MS, "--linger-ms", "TALLY_LINGER_MS")
    )]
    pub linger_ms: u64,

    /// Batch requests in flight at once.
    #[arg(
        long,
        env = "TALLY_BATCHES_IN_FLIGHT",
        default_value_t = ship_defaults::BATCHES_IN_FLIGHT,
        value_parser = in_range::<usize>(ship_accepted::BATCHES_IN_FLIGHT, "--batches-in-flight", "TALLY_BATCHES_IN_FLIGHT")
    )]
    pub batches_in_flight: usize,

    /// Longest wait between retries of a failing request, in seconds.
    #[arg(
        long,
        env = "TALLY_RETRY_CAP_SECS",
        default_value_t = ship_defaults::RETRY_CAP_SECS,
        value_parser = in_range::<u64>(ship_accepted::RETRY_CAP_SECS, "--retry-cap-secs", "TALLY_RETRY_CAP_SECS")
    )]
    pub retry_cap_secs: u64,

    /// Timeout of one Lago request, in seconds.
    #[arg(
        long,
        env = "TALLY_REQUEST_TIMEOUT_SECS",
        default_value_t = ship_defaults::REQUEST_TIMEOUT_SECS,
        value_parser = in_range::<u64>(ship_accepted::REQUEST_TIMEOUT_SECS, "--request-timeout-secs", "TALLY_REQUEST_TIMEOUT_SECS")
    )]
    pub request_timeout_secs: u64,

    /// On SIGTERM, how long in-flight requests may take before they are abandoned, in seconds.
    #[arg(
        long,
        env = "TALLY_DRAIN_DEADLINE_SECS",
        default_value_t = ship_defaults::DRAIN_DEADLINE_SECS,
        value_parser = in_range::<u64>(ship_accepted::DRAIN_DEADLINE_SECS, "--drain-deadline-secs", "TALLY_DRAIN_DEADLINE_SECS")
    )]
    pub drain_deadline_secs: u64,

    /// Safety-net poll of the spend log when no file event arrives, in milliseconds.
    #[arg(
        long,
        env = "TALLY_POLL_INTERVAL_MS",
        default_value_t = ship_defaults::POLL_INTERVAL_MS,
        value_parser = in_range::<u64>(ship_accepted::POLL_INTERVAL_MS, "--poll-interval-ms", "TALLY_POLL_INTERVAL_MS")
    )]
    pub poll_interval_ms: u64,

    /// Longest accepted spend-log line in bytes; longer lines are rejected.
    #[arg(
        long,
        env = "TALLY_MAX_LINE_BYTES",
        default_value_t = ship_defaults::MAX_LINE_BYTES,
        value_parser = in_range::<usize>(ship_accepted::MAX_LINE_BYTES, "--max-line-bytes", "TALLY_MAX_LINE_BYTES")
    )]
    pub max_line_bytes: usize,

    /// Largest Lago request body in bytes: a batch is cut to fit (an event larger than this is
    /// sent alone). Below the 1 MiB body limit of nginx's default; a 413 splits a batch further.
    #[arg(
        long,
        env = "TALLY_BATCH_MAX_BYTES",
        default_value_t = ship_defaults::BATCH_MAX_BYTES,
        value_parser = in_range::<usize>(ship_accepted::BATCH_MAX_BYTES, "--batch-max-bytes", "TALLY_BATCH_MAX_BYTES")
    )]
    pub batch_max_bytes: usize,

    /// Keep acked transaction ids this many days (0 = forever) so replays never bill twice.
    #[arg(
        long,
        env = "TALLY_ACKED_RETENTION_DAYS",
        default_value_t = ship_defaults::ACKED_RETENTION_DAYS,
        value_parser = in_range::<u64>(ship_accepted::ACKED_RETENTION_DAYS, "--acked-retention-days", "TALLY_ACKED_RETENTION_DAYS")
    )]
    pub acked_retention_days: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ShipArgs {
    #[command(flatten)]
    pub shared: SharedArgs,
    #[command(flatten)]
    pub lago: LagoArgs,
    #[command(flatten)]
    pub tuning: ShipTuning,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "TALLY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Receive Lago's webhooks (events.errors) on this address, at POST /lago/webhooks.
    #[arg(long, env = "TALLY_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,

    /// Lago's HMAC signature token (Developers > Webhooks) that signs its webhooks (never printed).
    #[arg(long, env = "LAGO_WEBHOOK_HMAC_KEY", hide_env_values = true)]
    pub lago_webhook_hmac_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ReplayFormat {
    /// tally's own spend log.
    #[default]
    Tally,
    /// LiteLLM_SpendLogs rows exported as JSON lines.
    Litellm,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Spend-log files or glob patterns; `.gz` files are decompressed.
    #[arg(required = true)]
    pub files: Vec<String>,

    /// What the files hold: tally's spend log, or LiteLLM_SpendLogs rows as JSON lines.
    #[arg(long, value_enum, default_value_t = ReplayFormat::Tally)]
    pub format: ReplayFormat,

    /// Only records that ended at or after this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub since: Option<String>,

    /// Only records that ended before this time (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    pub until: Option<String>,

    /// Show what would be billed, per customer, without writing anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Deliver the replayed events to Lago before returning (needs LAGO_API_BASE and
    /// LAGO_API_KEY); exits 3 when some are still not acknowledged, saying why.
    #[arg(long, conflicts_with = "dry_run")]
    pub ship: bool,

    /// With --ship, how long to wait for Lago to acknowledge the events, in seconds.
    #[arg(long, default_value_t = 300, requires = "ship")]
    pub ship_timeout: u64,

    /// `json` for scripts: stable field names.
    #[arg(long, value_enum, default_value_t)]
    pub output_format: OutputFormat,

    #[command(flatten)]
    pub shared: SharedArgs,
    #[command(flatten)]
    pub lago: LagoArgs,
    #[command(flatten)]
    pub tuning: ShipTuning,
}

#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub action: QueueAction,

    /// `json` for scripts: stable field names.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub output_format: OutputFormat,

    /// The shipper's state directory (where `shipper.db` is).
    #[arg(
        long,
        global = true,
        env = "TALLY_STATE_DIR",
        default_value = crate::spend::DEFAULT_STATE_DIR
    )]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueState {
    Pending,
    Held,
    Dead,
    Rejected,
    Acked,
    /// Removed by `tally queue drop`, with the reason.
    Dropped,
    /// A status other than success: recorded, never billed.
    NotBillable,
    /// Acked, then reported by Lago's `events.errors` webhook as not billable.
    LagoError,
}

/// What `tally queue retry --state` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RetryState {
    Held,
    Dead,
}

#[derive(Debug, Clone, Subcommand)]
pub enum QueueAction {
    /// Counts by state, oldest pending age, last Lago error, per-file lag.
    Stats {
        /// Exit non-zero when the oldest pending event is older than this many seconds.
        #[arg(long)]
        max_age: Option<u64>,
    },
    /// List items in one state (default: everything that needs attention: dead, held,
    /// rejected, then pending).
    List {
        /// Only items in this state.
        #[arg(long, value_enum)]
        state: Option<QueueState>,
        /// At most this many items.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one event: its record, the Lago event it makes, attempts, last error.
    Show { transaction_id: String },
    /// Re-resolve and requeue dead or held events (the given IDs, or every one in --state,
    /// or every held and dead one).
    Retry {
        /// Every event in this state (instead of IDs).
        #[arg(long, value_enum, conflicts_with = "ids")]
        state: Option<RetryState>,
        /// Transaction ids to retry.
        ids: Vec<String>,
        /// Charge-by setting to re-resolve with (defaults to LAGO_API_CHARGE_BY).
        #[arg(long, env = "LAGO_API_CHARGE_BY", default_value = ship_defaults::CHARGE_BY)]
        charge_by: String,
        /// Code of the Lago billable metric the rebuilt events carry.
        #[arg(long, env = "LAGO_API_EVENT_CODE")]
        lago_api_event_code: Option<String>,
        /// As for `tally ship`: events rebuilt from held records carry
        /// `precise_total_amount_cents` (stored events keep theirs as they are).
        #[arg(
            long,
            env = "TALLY_PRECISE_AMOUNT",
            value_parser = clap::builder::BoolishValueParser::new(),
            default_value_t = false,
            num_args = 0..=1,
            default_missing_value = "true"
        )]
        precise_amount: bool,
        /// As for `tally ship`.
        #[arg(
            long,
            env = "TALLY_COST_MARKUP",
            default_value = ship_defaults::COST_MARKUP,
            allow_hyphen_values = true
        )]
        cost_markup: String,
    },
    /// Remove events without billing them; recorded with the reason. Exits 1 if any ID could
    /// not be dropped (unknown, or already acked).
    Drop {
        /// Transaction ids, or `rejected:<n>` for rejected lines (as `list` shows them).
        #[arg(required = true)]
        ids: Vec<String>,
        /// Why they are not billed; kept with them and shown by `show` and `list`.
        #[arg(long, required = true)]
        reason: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Keep the demo's files here instead of a fresh temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// `json` for scripts: stable field names.
    #[arg(long, value_enum, default_value_t)]
    pub output_format: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct LagoEmulatorArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    #[arg(long, default_value_t = 3000)]
    pub port: u16,

    /// API key with write access that the emulator accepts.
    #[arg(
        long,
        env = "LAGO_API_KEY",
        hide_env_values = true,
        default_value = crate::lago_emulator::DEFAULT_API_KEY
    )]
    pub api_key: String,

    /// A second key that may read events but not send them (POST answers 403).
    #[arg(long, env = "LAGO_EMULATOR_READ_ONLY_KEY", hide_env_values = true)]
    pub read_only_api_key: Option<String>,

    /// Which Lago event store to imitate: `postgres` rejects duplicates with 422
    /// `value_already_exist`, `clickhouse` always answers 200 and merges them.
    #[arg(long, value_enum, default_value = "postgres")]
    pub store: crate::lago_emulator::StoreKind,

    /// Most events a batch may carry (Lago's `LAGO_EVENTS_BATCH_MAX_LENGTH`).
    #[arg(long, env = "LAGO_EVENTS_BATCH_MAX_LENGTH", default_value_t = crate::lago_emulator::DEFAULT_BATCH_MAX_LENGTH)]
    pub batch_max_length: usize,

    /// The external_subscription_ids Lago knows (comma-separated or repeated); when none is
    /// given every id is taken as a subscription.
    #[arg(
        long = "subscription",
        env = "LAGO_EMULATOR_SUBSCRIPTIONS",
        value_delimiter = ','
    )]
    pub known_subscriptions: Vec<String>,

    /// A billable metric, `CODE` or `CODE:AGGREGATION_PROPERTY` (repeatable): stored events
    /// that match none are reported in `events.errors` webhooks.
    #[arg(long = "metric", env = "LAGO_EMULATOR_METRICS", value_delimiter = ',')]
    pub metrics: Vec<crate::lago_emulator::Metric>,

    /// Where to send `events.errors` webhooks (e.g. http://127.0.0.1:8088/lago/webhooks).
    #[arg(long, env = "LAGO_EMULATOR_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// HMAC key that signs the webhooks (X-Lago-Signature); without it they are signed `jwt`
    /// (RS256, the public key at GET /api/v1/webhooks/public_key).
    #[arg(long, env = "LAGO_WEBHOOK_HMAC_KEY", hide_env_values = true)]
    pub webhook_hmac_key: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn lago_key_value_is_never_shown_in_help() {
        // SAFETY: tests in this module do not read the environment concurrently.
        unsafe { std::env::set_var("LAGO_API_KEY", "secret-value-123") };
        let help = Cli::command()
            .find_subcommand_mut("ship")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        assert!(help.contains("LAGO_API_KEY"));
        assert!(!help.contains("secret-value-123"));
    }

    #[test]
    fn ship_tuning_defaults() {
        let cli = Cli::try_parse_from(["tally", "ship"]).unwrap();
        let Command::Ship(ship) = cli.command else {
            panic!("expected ship")
        };
        assert_eq!(ship.tuning.batch_size, 100);
        assert_eq!(ship.lago.lago_api_charge_by, "end_user_id");
    }

    #[test]
    fn tuning_out_of_range_is_refused_naming_the_flag_and_the_range() {
        for (flag, value, accepted) in [
            ("--batch-size", "101", "1..=100"),
            ("--batch-size", "0", "1..=100"),
            ("--batches-in-flight", "0", "1..=256"),
            ("--linger-ms", "60001", "0..=60000"),
            ("--retry-cap-secs", "0", "1..=86400"),
            ("--request-timeout-secs", "3601", "1..=3600"),
            ("--drain-deadline-secs", "3601", "0..=3600"),
            ("--poll-interval-ms", "9", "10..=3600000"),
            ("--max-line-bytes", "1023", "1024..=67108864"),
            ("--batch-max-bytes", "100", "1024..=67108864"),
            ("--acked-retention-days", "36501", "0..=36500"),
        ] {
            let err = Cli::try_parse_from(["tally", "ship", flag, value]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            let text = err.to_string();
            assert!(text.contains(flag), "{flag} {value}: {text}");
            assert!(text.contains(accepted), "{flag} {value}: {text}");
            let env = format!("TALLY_{}", flag[2..].replace('-', "_").to_uppercase());
            assert!(text.contains(&env), "{flag} {value}: {text}");
        }
        for (flag, value) in [
            ("--batch-size", "1"),
            ("--batch-size", "100"),
            ("--linger-ms", "0"),
            ("--acked-retention-days", "0"),
        ] {
            assert!(
                Cli::try_parse_from(["tally", "ship", flag, value]).is_ok(),
                "{flag} {value}"
            );
        }
    }
}
