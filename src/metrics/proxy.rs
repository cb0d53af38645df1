//! The proxy's metrics: what clients asked for and what it cost.
//!
//! | series | labels |
//! |---|---|
//! | `tally_proxy_requests_total` | `model`, `status`, `team`, `key_alias` |
//! | `tally_proxy_request_duration_seconds` (histogram) | `model` |
//! | `tally_proxy_requests_in_flight` | |
//! | `tally_proxy_upstream_errors_total` | `model`, `kind` |
//! | `tally_proxy_tokens_total` | `model`, `direction` (`input`, `output`) |
//! | `tally_proxy_cost_usd_total` | `model` |
//! | `tally_proxy_spend_records_total` | `outcome` (`written`, `failed`) |
//!
//! `model` is limited to the models in the config (anything else is `other`); `team` and
//! `key_alias` to the first [`KEY_LABEL_LIMIT`] distinct values each.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::labels::{BoundedValues, NONE, OTHER};

/// Distinct teams (and, separately, key aliases) that get their own series.
pub const KEY_LABEL_LIMIT: usize = 200;

/// Upper bounds of the request latency buckets, in seconds: LLM calls range from a cached
/// few milliseconds to minutes of streaming.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    status: u16,
    team: String,
    key_alias: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Why a call to an upstream model failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// No connection (refused, DNS, TLS).
    Connect,
    /// No (complete) answer within the model's timeout.
    Timeout,
    /// The upstream answered 5xx.
    ServerError,
    /// The upstream answered 4xx (e.g. the provider key is wrong, or a rate limit).
    ClientError,
    /// An answer that could not be understood (bad JSON, a broken stream).
    InvalidResponse,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::ServerError => "server_error",
            Self::ClientError => "client_error",
            Self::InvalidResponse => "invalid_response",
        }
    }
}

/// One finished client request, as the proxy saw it.
#[derive(Debug, Clone, Copy)]
pub struct RequestOutcome<'a> {
    /// The `model` the client asked for (the config's `model_name`), if any.
    pub model: Option<&'a str>,
    /// The HTTP status the client got.
    pub status: u16,
    /// From the virtual key used; `None` for the master key or no key.
    pub team_id: Option<&'a str>,
    pub key_alias: Option<&'a str>,
    /// From the request's arrival to its last byte.
    pub duration: Duration,
}

/// The proxy's metrics; clone it into handlers (clones share the same series).
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<ModelLabels, Histogram>,
    in_flight: Gauge,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, Counter<f64, AtomicU64>>,
    spend_records: Family<OutcomeLabels, Counter>,
    written: Counter,
    failed: Counter,
    models: Arc<ModelTable>,
    teams: Arc<BoundedValues>,
    key_aliases: Arc<BoundedValues>,
}

impl ProxyMetrics {
    /// Registers the proxy's series in `registry`. `models` are the `model_name`s of the config;
    /// requests for any other model are counted under `model="other"`.
    pub fn register<I, S>(registry: &mut Registry, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut metrics = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            in_flight: Gauge::default(),
            upstream_errors: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            spend_records: Family::default(),
            written: Counter::default(),
            failed: Counter::default(),
            models: Arc::new(ModelTable {
                configured: models
                    .into_iter()
                    .map(|m| {
                        let slot = ModelSlot::new(m.into());
                        (slot.name.clone(), slot)
                    })
                    .collect(),
                other: ModelSlot::new(OTHER.to_owned()),
                none: ModelSlot::new(NONE.to_owned()),
            }),
            teams: Arc::new(BoundedValues::first_seen(KEY_LABEL_LIMIT)),
            key_aliases: Arc::new(BoundedValues::first_seen(KEY_LABEL_LIMIT)),
        };
        registry.register(
            "tally_proxy_requests",
            "Client requests by model, HTTP status, team and key alias",
            metrics.requests.clone(),
        );
        registry.register(
            "tally_proxy_request_duration_seconds",
            "Time from a request's arrival to its last response byte",
            metrics.latency.clone(),
        );
        registry.register(
            "tally_proxy_requests_in_flight",
            "Client requests being served now",
            metrics.in_flight.clone(),
        );
        registry.register(
            "tally_proxy_upstream_errors",
            "Failed calls to upstream models, by kind",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            "tally_proxy_tokens",
            "Tokens used, as the upstream reported them (or counted)",
            metrics.tokens.clone(),
        );
        registry.register(
            "tally_proxy_cost_usd",
            "Cost of completed requests in US dollars, from the price table",
            metrics.cost.clone(),
        );
        registry.register(
            "tally_proxy_spend_records",
            "Spend-log appends; a failed one means the request was not billed",
            metrics.spend_records.clone(),
        );
        // Held here so a request does not look them up (both are shown from the start, at 0).
        for (counter, outcome) in [
            (&mut metrics.written, "written"),
            (&mut metrics.failed, "failed"),
        ] {
            *counter = metrics
                .spend_records
                .get_or_create_owned(&OutcomeLabels { outcome });
        }
        metrics
    }

    /// The `model` label value for `model`, with its series.
    fn model(&self, model: Option<&str>) -> &ModelSlot {
        let table = &*self.models;
        match model {
            None | Some("") => &table.none,
            Some(m) => table.configured.get(m).unwrap_or(&table.other),
        }
    }

    /// Counts one finished request and its latency.
    pub fn record_request(&self, request: &RequestOutcome<'_>) {
        let model = self.model(request.model);
        model
            .latency
            .get_or_init(|| self.latency.get_or_create_owned(&model.labels()))
            .observe(request.duration.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                model: model.name.clone(),
                status: request.status,
                team: self.teams.label(request.team_id),
                key_alias: self.key_aliases.label(request.key_alias),
            })
            .inc();
    }

    /// Counts the usage and cost of one completed request (`cost_usd` is `None` for a model
    /// without a price).
    pub fn record_usage(
        &self,
        model: &str,
        input_tokens: u64,
        output_tokens: u64,
        cost_usd: Option<f64>,
    ) {
        let model = self.model(Some(model));
        let [input, output] = model.tokens.get_or_init(|| {
            ["input", "output"].map(|direction| {
                self.tokens.get_or_create_owned(&TokenLabels {
                    model: model.name.clone(),
                    direction,
                })
            })
        });
        input.inc_by(input_tokens);
        output.inc_by(output_tokens);
        if let Some(cost) = cost_usd.filter(|c| c.is_finite() && *c >= 0.0) {
            model
                .cost
                .get_or_init(|| self.cost.get_or_create_owned(&model.labels()))
                .inc_by(cost);
        }
    }

    pub fn record_upstream_error(&self, model: &str, kind: UpstreamErrorKind) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                model: self.model(Some(model)).name.clone(),
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Counts one spend-log append (`written == false`: it failed).
    pub fn record_spend_record(&self, written: bool) {
        if written {
            self.written.inc();
        } else {
            self.failed.inc();
        }
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight {
            gauge: self.in_flight.clone(),
        }
    }
}

/// A `model` label value and its series, each created on its first use (as a family would)
/// and then kept, so recording a request hashes no label sets.
#[derive(Debug)]
struct ModelSlot {
    name: String,
    latency: OnceLock<Histogram>,
    /// Input, then output.
    tokens: OnceLock<[Counter; 2]>,
    /// Only for a model with a price: an unpriced model has no cost series.
    cost: OnceLock<Counter<f64, AtomicU64>>,
}

impl ModelSlot {
    fn new(name: String) -> Self {
        Self {
            name,
            latency: OnceLock::new(),
            tokens: OnceLock::new(),
            cost: OnceLock::new(),
        }
    }

    fn labels(&self) -> ModelLabels {
        ModelLabels {
            model: self.name.clone(),
        }
    }
}

/// The values `model` may take: the config's model names, [`OTHER`] for any other, [`NONE`]
/// for a request without one.
#[derive(Debug)]
struct ModelTable {
    configured: HashMap<String, ModelSlot>,
    other: ModelSlot,
    none: ModelSlot,
}

/// Decrements `tally_proxy_requests_in_flight` when dropped (also when a client disconnects
/// mid-stream and the response future is dropped).
#[derive(Debug)]
pub struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::testing::{get, parse};
    use crate::metrics::{Exposition, Format};

    fn setup() -> (ProxyMetrics, Exposition) {
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::register(&mut registry, ["gpt-4o", "house-model"]);
        (metrics, Exposition::from(registry))
    }

    fn request<'a>(model: &'a str, status: u16, team: Option<&'a str>) -> RequestOutcome<'a> {
        RequestOutcome {
            model: Some(model),
            status,
            team_id: team,
            key_alias: team.map(|_| "ci-key"),
            duration: Duration::from_millis(300),
        }
    }

    #[test]
    fn requests_are_counted_by_model_status_team_and_key() {
        let (metrics, exposition) = setup();
        for _ in 0..3 {
            metrics.record_request(&request("gpt-4o", 200, Some("team-a")));
        }
        metrics.record_request(&request("house-model", 429, Some("team-a")));
        metrics.record_request(&request("gpt-4o", 401, None));
        // A model the config does not have must not create its own series.
        metrics.record_request(&request("anything-a-client-types", 400, Some("team-a")));

        for format in [Format::OpenMetrics, Format::PrometheusText] {
            let m = parse(&exposition.encode(format).unwrap());
            let r = |labels: &str| get(&m, &format!("tally_proxy_requests_total{{{labels}}}"));
            assert_eq!(
                r(r#"key_alias="ci-key",model="gpt-4o",status="200",team="team-a""#),
                3.0
            );
            assert_eq!(
                r(r#"key_alias="ci-key",model="house-model",status="429",team="team-a""#),
                1.0
            );
            assert_eq!(
                r(r#"key_alias="none",model="gpt-4o",status="401",team="none""#),
                1.0
            );
            assert_eq!(
                r(r#"key_alias="ci-key",model="other",status="400",team="team-a""#),
                1.0
            );
            assert!(!m.keys().any(|k| k.contains("anything-a-client-types")));

            let h = |s: &str| get(&m, &format!("tally_proxy_request_duration_seconds_{s}"));
            assert_eq!(h(r#"count{model="gpt-4o"}"#), 4.0);
            assert!((h(r#"sum{model="gpt-4o"}"#) - 1.2).abs() < 1e-9);
            // 300 ms: above the 0.25 s bucket, inside the 0.5 s one.
            assert_eq!(h(r#"bucket{le="0.25",model="gpt-4o"}"#), 0.0);
            assert_eq!(h(r#"bucket{le="0.5",model="gpt-4o"}"#), 4.0);
            assert_eq!(h(r#"bucket{le="+Inf",model="gpt-4o"}"#), 4.0);
            assert_eq!(h(r#"count{model="other"}"#), 1.0);
        }
    }

    #[test]
    fn tokens_cost_upstream_errors_and_spend_records() {
        let (metrics, exposition) = setup();
        metrics.record_usage("gpt-4o", 7, 15, Some(0.0001675));
        metrics.record_usage("gpt-4o", 3, 5, Some(0.0001));
        metrics.record_usage("house-model", 10, 20, None);
        metrics.record_usage("made-up", 1, 2, Some(0.5));
        metrics.record_upstream_error("gpt-4o", UpstreamErrorKind::Timeout);
        metrics.record_upstream_error("gpt-4o", UpstreamErrorKind::Timeout);
        metrics.record_upstream_error("house-model", UpstreamErrorKind::ServerError);
        metrics.record_spend_record(true);
        metrics.record_spend_record(true);
        metrics.record_spend_record(false);

        let m = parse(&exposition.encode(Format::OpenMetrics).unwrap());
        let tokens = |l: &str| get(&m, &format!("tally_proxy_tokens_total{{{l}}}"));
        assert_eq!(tokens(r#"direction="input",model="gpt-4o""#), 10.0);
        assert_eq!(tokens(r#"direction="output",model="gpt-4o""#), 20.0);
        assert_eq!(tokens(r#"direction="output",model="house-model""#), 20.0);
        assert_eq!(tokens(r#"direction="output",model="other""#), 2.0);
        assert_eq!(get(&m, r#"tally_proxy_cost_usd_total{model="other"}"#), 0.5);
        assert!(!m.keys().any(|k| k.contains("made-up")));
        let cost = get(&m, r#"tally_proxy_cost_usd_total{model="gpt-4o"}"#);
        assert!((cost - 0.0002675).abs() < 1e-12, "cost {cost}");
        assert!(
            !m.contains_key(r#"tally_proxy_cost_usd_total{model="house-model"}"#),
            "no price, no cost series"
        );
        assert_eq!(
            get(
                &m,
                r#"tally_proxy_upstream_errors_total{kind="timeout",model="gpt-4o"}"#
            ),
            2.0
        );
        assert_eq!(
            get(
                &m,
                r#"tally_proxy_upstream_errors_total{kind="server_error",model="house-model"}"#
            ),
            1.0
        );
        let spend = |o: &str| {
            get(
                &m,
                &format!("tally_proxy_spend_records_total{{outcome=\"{o}\"}}"),
            )
        };
        assert_eq!(spend("written"), 2.0);
        assert_eq!(spend("failed"), 1.0);
    }

    #[test]
    fn in_flight_follows_the_guards() {
        let (metrics, exposition) = setup();
        let in_flight = || {
            get(
                &parse(&exposition.encode(Format::OpenMetrics).unwrap()),
                "tally_proxy_requests_in_flight",
            )
        };
        let a = metrics.in_flight();
        let b = metrics.in_flight();
        assert_eq!(in_flight(), 2.0);
        drop(a);
        assert_eq!(in_flight(), 1.0);
        drop(b);
        assert_eq!(in_flight(), 0.0);
    }

    #[test]
    fn team_and_key_labels_are_bounded() {
        let (metrics, exposition) = setup();
        for i in 0..KEY_LABEL_LIMIT + 50 {
            let team = format!("team-{i}");
            metrics.record_request(&RequestOutcome {
                model: Some("gpt-4o"),
                status: 200,
                team_id: Some(&team),
                key_alias: Some(&team),
                duration: Duration::from_millis(1),
            });
        }
        let m = parse(&exposition.encode(Format::OpenMetrics).unwrap());
        let series: Vec<_> = m
            .iter()
            .filter(|(k, _)| k.starts_with("tally_proxy_requests_total{"))
            .collect();
        assert_eq!(
            series.len(),
            KEY_LABEL_LIMIT + 1,
            "the limit plus one `other`"
        );
        assert_eq!(
            get(
                &m,
                r#"tally_proxy_requests_total{key_alias="other",model="gpt-4o",status="200",team="other"}"#
            ),
            50.0
        );
        let total: f64 = series.iter().map(|(_, v)| **v).sum();
        assert_eq!(total, (KEY_LABEL_LIMIT + 50) as f64, "nothing is lost");
    }
}
