//! Prometheus metrics, with the maintained `prometheus-client` crate.
//!
//! - [`ProxyMetrics`] (in [`proxy`]): requests by model, status, team and key alias; latency;
//!   upstream errors; tokens; cost; spend-log writes.
//! - [`ShipMetrics`] (in [`ship`]): lines read and rejected; events acked, held and dead; queue
//!   depth; oldest pending age; Lago request latency and outcomes; retries.
//! - [`Exposition`]: a finished registry, encoded for a scrape (OpenMetrics or Prometheus text,
//!   as the scraper asks).
//! - [`MetricsServer`] (in [`serve`]): a standalone `GET /metrics` listener, for the shipper's
//!   `--metrics-addr`.
//!
//! Usage: create a [`Registry`], let each metrics set register itself in it, then freeze the
//! registry into an [`Exposition`]. Recording never blocks on a scrape for long: counters are
//! atomics; label families take a read lock.
//!
//! Label values that come from outside the code (model names, teams, key aliases) go through
//! [`labels::BoundedValues`], so a client or a large key store cannot create unbounded series.

pub mod labels;
pub mod proxy;
pub mod serve;
pub mod ship;

use std::sync::Arc;

use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::registry::Registry;

pub use proxy::ProxyMetrics;
pub use serve::{MetricsError, MetricsServer};
pub use ship::ShipMetrics;

/// Content type of the OpenMetrics text format (what Prometheus asks for first).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format (for anything else, e.g. `curl`).
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Registers `tally_build_info{version="…"} 1`, so dashboards can tell versions apart during an
/// upgrade.
pub fn register_build_info(registry: &mut Registry) {
    let info: Family<BuildLabels, Gauge> = Family::default();
    info.get_or_create(&BuildLabels {
        version: env!("CARGO_PKG_VERSION"),
    })
    .set(1);
    registry.register(
        "tally_build_info",
        "The running tally version (always 1)",
        info,
    );
}

/// A registry ready to be scraped; cheap to clone into handlers.
#[derive(Clone, Debug)]
pub struct Exposition {
    registry: Arc<Registry>,
}

impl From<Registry> for Exposition {
    fn from(registry: Registry) -> Self {
        Self {
            registry: Arc::new(registry),
        }
    }
}

/// The text formats a scrape can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it (Prometheus does), the classic text format
    /// otherwise.
    pub fn negotiate(accept: Option<&HeaderValue>) -> Self {
        match accept.and_then(|v| v.to_str().ok()) {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::PrometheusText => PROMETHEUS_TEXT_CONTENT_TYPE,
        }
    }
}

impl Exposition {
    /// The current values of every registered metric, in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
            Format::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
        }
        Ok(out)
    }

    /// The HTTP response to a scrape with these request headers; for use in any axum handler
    /// (e.g. after the proxy's authorization check).
    pub fn respond(&self, headers: &HeaderMap) -> Response {
        let format = Format::negotiate(headers.get(ACCEPT));
        match self.encode(format) {
            Ok(body) => ([(CONTENT_TYPE, format.content_type())], body).into_response(),
            Err(_) => {
                // Encoding into a String only fails if a metric's own encoder does.
                tracing::error!("cannot encode the metrics registry");
                (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A small parser of the text exposition, so tests assert values, not substrings.

    use std::collections::BTreeMap;

    /// Sample name with its labels (sorted, `name{a="1",b="2"}`), mapped to its value.
    pub fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let key = match series.split_once('{') {
                None => series.to_string(),
                Some((name, labels)) => {
                    let labels = labels.strip_suffix('}').expect("labels end with }");
                    let mut pairs: Vec<&str> = split_labels(labels);
                    pairs.sort_unstable();
                    format!("{name}{{{}}}", pairs.join(","))
                }
            };
            assert!(
                samples.insert(key.clone(), value).is_none(),
                "duplicate series {key}"
            );
        }
        samples
    }

    /// Splits `a="x",b="y,z"` at the commas between pairs (not inside quoted values).
    fn split_labels(labels: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, c) in labels.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    out.push(&labels[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if start < labels.len() {
            out.push(&labels[start..]);
        }
        out
    }

    /// The value of one series, e.g. `get(&m, "tally_ship_retries_total")`; panics when absent.
    pub fn get(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
        *samples
            .get(key)
            .unwrap_or_else(|| panic!("no series {key}; have: {:#?}", samples.keys()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testing::{get, parse};

    #[test]
    fn build_info_in_both_formats_and_eof_only_in_openmetrics() {
        let mut registry = Registry::default();
        register_build_info(&mut registry);
        let exposition = Exposition::from(registry);

        let key = format!(
            "tally_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        let om = exposition.encode(Format::OpenMetrics).unwrap();
        assert_eq!(get(&parse(&om), &key), 1.0);
        assert!(om.ends_with("# EOF\n"));
        let text = exposition.encode(Format::PrometheusText).unwrap();
        assert_eq!(get(&parse(&text), &key), 1.0);
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn format_follows_the_accept_header() {
        let prometheus = HeaderValue::from_static(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        );
        assert_eq!(Format::negotiate(Some(&prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some(&HeaderValue::from_static("*/*"))),
            Format::PrometheusText
        );
        assert_eq!(Format::negotiate(None), Format::PrometheusText);
    }
}
