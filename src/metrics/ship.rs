//! The shipper's metrics: how far it has read, what it delivered, and how Lago answered.
//!
//! | series | labels |
//! |---|---|
//! | `tally_ship_lines_read_total` | |
//! | `tally_ship_lines_rejected_total` | `reason` |
//! | `tally_ship_unpriced_records_total` (billable records without a `response_cost`) | |
//! | `tally_ship_events_total` | `outcome` (`acked`, `held`, `dead`) |
//! | `tally_ship_queue_events` | `state` (`pending`, `held`, `dead`, `rejected`) |
//! | `tally_ship_oldest_pending_age_seconds` | |
//! | `tally_ship_lago_request_duration_seconds` (histogram) | |
//! | `tally_ship_lago_requests_total` | `outcome` (see [`LagoOutcome`]) |
//! | `tally_ship_retries_total` | |
//! | `tally_ship_lago_unauthorized` | |
//! | `tally_ship_storage_blocked` | |
//! | `tally_ship_lago_error_events_total` | `category` (Lago's `events.errors` category) |
//! | `tally_ship_unknown_subscriptions` | |
//!
//! Alert on: `tally_ship_oldest_pending_age_seconds` (events not reaching Lago),
//! `tally_ship_queue_events{state="dead"} > 0`, `tally_ship_lago_unauthorized == 1`,
//! `tally_ship_storage_blocked == 1` (the state directory is full or read-only).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Upper bounds of the Lago request latency buckets, in seconds (a batch of 100 usually takes
/// tens of milliseconds; the request timeout is 30 s by default).
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// How one Lago request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagoOutcome {
    /// 200: every event of the batch is in Lago.
    Accepted,
    /// 422 for some events: the batch is split, the rejected ones are dealt with one by one
    /// (already in Lago: acked; otherwise: dead).
    Rejected,
    /// 429: Lago asked to slow down.
    RateLimited,
    /// 401 or 403: the API key is wrong; sending stops until it is fixed.
    Unauthorized,
    /// Another 4xx.
    ClientError,
    /// 5xx.
    ServerError,
    /// No answer within the request timeout.
    Timeout,
    /// No connection (refused, DNS, TLS, reset).
    Network,
    /// 3xx: a redirect, never followed (it is not an ack).
    Redirected,
    /// An answer that is not Lago's: a 200 without the `{"events": [...]}` envelope, or an
    /// answer longer than the shipper reads.
    InvalidAnswer,
}

impl LagoOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Network => "network",
            Self::Redirected => "redirected",
            Self::InvalidAnswer => "invalid_answer",
        }
    }

    /// The outcome of an HTTP answer with `status`.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=299 => Self::Accepted,
            300..=399 => Self::Redirected,
            401 | 403 => Self::Unauthorized,
            422 => Self::Rejected,
            429 => Self::RateLimited,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }
}

/// Counts of the outbox's items by state, as `tally queue stats` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub pending: u64,
    pub held: u64,
    pub dead: u64,
    pub rejected: u64,
}

/// The shipper's metrics; clone it into tasks (clones share the same series).
#[derive(Clone, Debug)]
pub struct ShipMetrics {
    lines_read: Counter,
    lines_rejected: Family<ReasonLabels, Counter>,
    unpriced: Counter,
    events: Family<OutcomeLabels, Counter>,
    queue: Family<StateLabels, Gauge>,
    oldest_pending_age: Gauge<f64, AtomicU64>,
    lago_latency: Histogram,
    lago_requests: Family<OutcomeLabels, Counter>,
    retries: Counter,
    lago_unauthorized: Gauge,
    storage_blocked: Gauge,
    lago_errors: Family<CategoryLabels, Counter>,
    unknown_subscriptions: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabels {
    category: &'static str,
}

impl ShipMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            lines_read: Counter::default(),
            lines_rejected: Family::default(),
            unpriced: Counter::default(),
            events: Family::default(),
            queue: Family::default(),
            oldest_pending_age: Gauge::default(),
            lago_latency: Histogram::new(LATENCY_BUCKETS),
            lago_requests: Family::default(),
            retries: Counter::default(),
            lago_unauthorized: Gauge::default(),
            storage_blocked: Gauge::default(),
            lago_errors: Family::default(),
            unknown_subscriptions: Gauge::default(),
        };
        registry.register(
            "tally_ship_lago_error_events",
            "Acked events Lago reported in an events.errors webhook (stored, not billed), by category",
            metrics.lago_errors.clone(),
        );
        registry.register(
            "tally_ship_unknown_subscriptions",
            "external_subscription_ids the shipper sends events for that Lago does not know (never billed)",
            metrics.unknown_subscriptions.clone(),
        );
        registry.register(
            "tally_ship_lines_read",
            "Spend-log lines read (and committed to the outbox)",
            metrics.lines_read.clone(),
        );
        registry.register(
            "tally_ship_lines_rejected",
            "Spend-log lines that are not a valid record, kept as rejected",
            metrics.lines_rejected.clone(),
        );
        registry.register(
            "tally_ship_unpriced_records",
            "Billable spend records read without a response_cost (their events carry no precise_total_amount_cents)",
            metrics.unpriced.clone(),
        );
        registry.register(
            "tally_ship_events",
            "Events that left the pending queue: acked by Lago, held, or dead",
            metrics.events.clone(),
        );
        registry.register(
            "tally_ship_queue_events",
            "Outbox items by state now",
            metrics.queue.clone(),
        );
        registry.register(
            "tally_ship_oldest_pending_age_seconds",
            "Age of the oldest event not yet acknowledged by Lago (0 when none is pending)",
            metrics.oldest_pending_age.clone(),
        );
        registry.register(
            "tally_ship_lago_request_duration_seconds",
            "Duration of batch requests to Lago",
            metrics.lago_latency.clone(),
        );
        registry.register(
            "tally_ship_lago_requests",
            "Batch requests to Lago by outcome",
            metrics.lago_requests.clone(),
        );
        registry.register(
            "tally_ship_retries",
            "Requests to Lago sent again after a failure",
            metrics.retries.clone(),
        );
        registry.register(
            "tally_ship_lago_unauthorized",
            "1 while sending is stopped because Lago refused the API key (401/403)",
            metrics.lago_unauthorized.clone(),
        );
        registry.register(
            "tally_ship_storage_blocked",
            "1 while the shipper waits because the outbox cannot be written (state directory full, read-only or failing)",
            metrics.storage_blocked.clone(),
        );
        // Every state is present from the start, so an alert on `dead > 0` has a series to
        // evaluate before the first dead event.
        metrics.set_queue_depth(QueueDepth::default());
        metrics
    }

    /// Counts `n` spend-log lines read.
    pub fn record_lines_read(&self, n: u64) {
        self.lines_read.inc_by(n);
    }

    /// Counts `n` billable records read without a price.
    pub fn record_unpriced(&self, n: u64) {
        self.unpriced.inc_by(n);
    }

    /// Counts `n` rejected lines. `reason` is a fixed name from the code (`tally ship` uses
    /// `invalid` and `conflict`), never text from the line.
    pub fn record_lines_rejected(&self, reason: &'static str, n: u64) {
        self.lines_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }

    /// Counts `n` events Lago acknowledged (200, or 422 "already exists").
    pub fn record_acked(&self, n: u64) {
        self.record_events("acked", n);
    }

    /// Counts `n` events held back (e.g. no customer id to charge).
    pub fn record_held(&self, n: u64) {
        self.record_events("held", n);
    }

    /// Counts `n` events Lago rejected for good (parked as dead with its reason).
    pub fn record_dead(&self, n: u64) {
        self.record_events("dead", n);
    }

    fn record_events(&self, outcome: &'static str, n: u64) {
        self.events
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n);
    }

    /// Sets the queue gauges from a count of the outbox.
    pub fn set_queue_depth(&self, depth: QueueDepth) {
        for (state, n) in [
            ("pending", depth.pending),
            ("held", depth.held),
            ("dead", depth.dead),
            ("rejected", depth.rejected),
        ] {
            self.queue
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Sets the age of the oldest pending event (`None`: nothing is pending).
    pub fn set_oldest_pending_age(&self, age: Option<Duration>) {
        self.oldest_pending_age
            .set(age.map_or(0.0, |a| a.as_secs_f64()));
    }

    /// Counts one Lago request and how long it took.
    pub fn record_lago_request(&self, outcome: LagoOutcome, duration: Duration) {
        self.lago_latency.observe(duration.as_secs_f64());
        self.lago_requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts one resend of a failed request.
    pub fn record_retry(&self) {
        self.retries.inc();
    }

    /// Whether sending is stopped because Lago refused the API key.
    pub fn set_lago_unauthorized(&self, unauthorized: bool) {
        self.lago_unauthorized.set(i64::from(unauthorized));
    }

    /// Counts `n` events moved to lago-error. `category` is one of the fixed names in
    /// `ship::webhook::CATEGORIES`, never text from the webhook.
    pub fn record_lago_errors(&self, category: &'static str, n: u64) {
        self.lago_errors
            .get_or_create(&CategoryLabels { category })
            .inc_by(n);
    }

    /// How many external_subscription_ids Lago does not know, as last checked.
    pub fn set_unknown_subscriptions(&self, n: u64) {
        self.unknown_subscriptions
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether the shipper waits for its state directory to become writable again.
    pub fn set_storage_blocked(&self, blocked: bool) {
        self.storage_blocked.set(i64::from(blocked));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::testing::{get, parse};
    use crate::metrics::{Exposition, Format};

    #[test]
    fn every_record_method_shows_in_the_exposition() {
        let mut registry = Registry::default();
        let metrics = ShipMetrics::register(&mut registry);
        let exposition = Exposition::from(registry);

        metrics.record_lines_read(10);
        metrics.record_lines_read(5);
        metrics.record_lines_rejected("malformed", 1);
        metrics.record_lines_rejected("malformed", 1);
        metrics.record_lines_rejected("too_long", 1);
        metrics.record_acked(12);
        metrics.record_held(1);
        metrics.record_dead(2);
        metrics.record_dead(1);
        metrics.set_queue_depth(QueueDepth {
            pending: 4,
            held: 1,
            dead: 3,
            rejected: 3,
        });
        metrics.set_oldest_pending_age(Some(Duration::from_millis(90_500)));
        metrics.record_lago_request(LagoOutcome::Accepted, Duration::from_millis(40));
        metrics.record_lago_request(LagoOutcome::from_status(503), Duration::from_millis(700));
        metrics.record_lago_request(LagoOutcome::from_status(503), Duration::from_millis(20));
        metrics.record_retry();
        metrics.record_retry();
        metrics.set_lago_unauthorized(true);
        metrics.set_storage_blocked(true);
        metrics.record_lago_errors("invalid_code", 2);
        metrics.record_lago_errors("invalid_code", 1);
        metrics.set_unknown_subscriptions(4);

        for format in [Format::OpenMetrics, Format::PrometheusText] {
            let m = parse(&exposition.encode(format).unwrap());
            assert_eq!(get(&m, "tally_ship_lines_read_total"), 15.0);
            assert_eq!(
                get(&m, r#"tally_ship_lines_rejected_total{reason="malformed"}"#),
                2.0
            );
            assert_eq!(
                get(&m, r#"tally_ship_lines_rejected_total{reason="too_long"}"#),
                1.0
            );
            let events = |o: &str| get(&m, &format!("tally_ship_events_total{{outcome=\"{o}\"}}"));
            assert_eq!(events("acked"), 12.0);
            assert_eq!(events("held"), 1.0);
            assert_eq!(events("dead"), 3.0);
            let queue = |s: &str| get(&m, &format!("tally_ship_queue_events{{state=\"{s}\"}}"));
            assert_eq!(queue("pending"), 4.0);
            assert_eq!(queue("held"), 1.0);
            assert_eq!(queue("dead"), 3.0);
            assert_eq!(queue("rejected"), 3.0);
            assert_eq!(get(&m, "tally_ship_oldest_pending_age_seconds"), 90.5);
            assert_eq!(get(&m, "tally_ship_storage_blocked"), 1.0);
            assert_eq!(
                get(
                    &m,
                    r#"tally_ship_lago_error_events_total{category="invalid_code"}"#
                ),
                3.0
            );
            assert_eq!(get(&m, "tally_ship_unknown_subscriptions"), 4.0);
            let lago = |o: &str| {
                get(
                    &m,
                    &format!("tally_ship_lago_requests_total{{outcome=\"{o}\"}}"),
                )
            };
            assert_eq!(lago("accepted"), 1.0);
            assert_eq!(lago("server_error"), 2.0);
            assert_eq!(
                get(&m, "tally_ship_lago_request_duration_seconds_count"),
                3.0
            );
            assert_eq!(
                get(
                    &m,
                    r#"tally_ship_lago_request_duration_seconds_bucket{le="0.05"}"#
                ),
                2.0
            );
            assert_eq!(get(&m, "tally_ship_retries_total"), 2.0);
            assert_eq!(get(&m, "tally_ship_lago_unauthorized"), 1.0);
        }

        metrics.set_oldest_pending_age(None);
        metrics.set_lago_unauthorized(false);
        let m = parse(&exposition.encode(Format::OpenMetrics).unwrap());
        assert_eq!(get(&m, "tally_ship_oldest_pending_age_seconds"), 0.0);
        assert_eq!(get(&m, "tally_ship_lago_unauthorized"), 0.0);
    }

    #[test]
    fn queue_states_exist_before_anything_happens() {
        let mut registry = Registry::default();
        let _metrics = ShipMetrics::register(&mut registry);
        let m = parse(
            &Exposition::from(registry)
                .encode(Format::OpenMetrics)
                .unwrap(),
        );
        for state in ["pending", "held", "dead", "rejected"] {
            assert_eq!(
                get(&m, &format!("tally_ship_queue_events{{state=\"{state}\"}}")),
                0.0
            );
        }
    }

    #[test]
    fn lago_status_codes_map_to_outcome_classes() {
        assert_eq!(LagoOutcome::from_status(200), LagoOutcome::Accepted);
        assert_eq!(LagoOutcome::from_status(401), LagoOutcome::Unauthorized);
        assert_eq!(LagoOutcome::from_status(403), LagoOutcome::Unauthorized);
        assert_eq!(LagoOutcome::from_status(422), LagoOutcome::Rejected);
        assert_eq!(LagoOutcome::from_status(429), LagoOutcome::RateLimited);
        assert_eq!(LagoOutcome::from_status(404), LagoOutcome::ClientError);
        assert_eq!(LagoOutcome::from_status(502), LagoOutcome::ServerError);
    }
}
