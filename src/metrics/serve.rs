//! A standalone `GET /metrics` listener (the shipper's `--metrics-addr`).
//!
//! Bind first, then run: binding is where a wrong address or a port in use shows up, and a
//! service binds before it tells systemd it is ready.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Exposition;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {addr}: {source} (is the port in use? set \
         TALLY_METRICS_ADDR / --metrics-addr to a free address)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the metrics listener failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The router with `GET /metrics` only.
pub fn router(exposition: Exposition) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(exposition)
}

async fn scrape(State(exposition): State<Exposition>, headers: HeaderMap) -> Response {
    exposition.respond(&headers)
}

/// A bound metrics listener, not yet serving.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    exposition: Exposition,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr, exposition: Exposition) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self {
            listener,
            exposition,
        })
    }

    /// The address actually bound (the port, when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, MetricsError> {
        self.listener.local_addr().map_err(MetricsError::Serve)
    }

    /// Serves scrapes until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), MetricsError> {
        axum::serve(self.listener, router(self.exposition))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(MetricsError::Serve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::testing::{get, parse};
    use crate::metrics::{OPENMETRICS_CONTENT_TYPE, Registry, ShipMetrics};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A minimal HTTP/1.1 GET, so the test needs no HTTP client.
    async fn http_get(addr: SocketAddr, path: &str, accept: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_the_registry_until_shutdown() {
        let mut registry = Registry::default();
        let metrics = ShipMetrics::register(&mut registry);
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), registry.into())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));

        metrics.record_lines_read(3);
        metrics.record_acked(2);
        let response = http_get(addr, "/metrics", "application/openmetrics-text").await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
            "{head}"
        );
        let m = parse(body);
        assert_eq!(get(&m, "tally_ship_lines_read_total"), 3.0);
        assert_eq!(get(&m, r#"tally_ship_events_total{outcome="acked"}"#), 2.0);

        let response = http_get(addr, "/", "*/*").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");

        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = MetricsServer::bind(addr, Registry::default().into())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
