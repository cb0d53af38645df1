//! A local Lago events API that answers like the real server (docs/lago-emulator.md), for
//! tests, the demo, benchmarks and users without a Lago instance; `tally lago-emulator`.
//!
//! - [`validate`]: one JSON event → the fields Lago keeps, or its per-field errors.
//! - [`store`]: stored events and the Postgres / ClickHouse uniqueness rules.
//! - [`api`]: the `/api/v1/events` routes, exact bodies, and the fault/counter gate.
//! - [`faults`]: injectable faults (5xx, 429, delays, dropped connections, refusing).
//! - [`counters`]: request and event counters.
//! - [`control`]: `/_emulator/...`, the HTTP form of [`EmulatorHandle`].
//! - [`server`]: the socket, its connections, stop/resume listening.

mod api;
mod control;
mod counters;
mod faults;
mod server;
mod store;
mod validate;
mod webhooks;

use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use counters::Counters;
pub use faults::Fault;
pub use store::{StoreKind, StoredEvent};
pub use webhooks::{Metric, WebhookConfig};

/// The write key the emulator accepts when none is given (CLI and [`EmulatorConfig::default`]).
pub const DEFAULT_API_KEY: &str = "lago-emulator-key";
/// Lago's default `LAGO_EVENTS_BATCH_MAX_LENGTH`.
pub const DEFAULT_BATCH_MAX_LENGTH: usize = 100;

/// How the emulator behaves.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The key with write access (`Authorization: Bearer <key>`).
    pub api_key: String,
    /// A key that may read (`GET`) but not send events: `POST` answers 403.
    pub read_only_api_key: Option<String>,
    /// Lago's `LAGO_EVENTS_BATCH_MAX_LENGTH`: more events in a batch is 422 `too_many_events`.
    pub batch_max_length: usize,
    /// Which Lago event store to imitate (duplicates rejected or silently merged).
    pub store: StoreKind,
    /// The external_subscription_ids `GET /api/v1/subscriptions/{id}` knows; `None`: every id
    /// is a subscription (so tests and the demo that never set any keep billing).
    pub known_subscriptions: Option<std::collections::HashSet<String>>,
    /// Billable metrics; stored events that match none (or lack the aggregation property) are
    /// reported in `events.errors` webhooks. Empty: no checks.
    pub metrics: Vec<Metric>,
    /// Where `events.errors` webhooks go.
    pub webhook: Option<WebhookConfig>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_string(),
            read_only_api_key: None,
            batch_max_length: DEFAULT_BATCH_MAX_LENGTH,
            store: StoreKind::Postgres,
            known_subscriptions: None,
            metrics: Vec::new(),
            webhook: None,
        }
    }
}

/// Everything the routes share. One lock (`store`) on the hot path.
pub(crate) struct Emulator {
    api_key_hash: [u8; 32],
    read_only_key_hash: Option<[u8; 32]>,
    batch_max_length: usize,
    store: Mutex<store::Store>,
    faults: faults::FaultQueue,
    /// [`Fault::BodyLimit`]: request bodies longer than this are answered 413 (0: no limit).
    body_limit: std::sync::atomic::AtomicUsize,
    counters: counters::AtomicCounters,
    net: server::Net,
    /// `lago_id`s are a random per-emulator base plus a counter: unique, and no system call
    /// for randomness per event.
    lago_id_base: u128,
    lago_id_counter: AtomicU64,
    known_subscriptions: Option<std::collections::HashSet<String>>,
    metrics: Vec<Metric>,
    webhook: Option<WebhookConfig>,
    /// The `jwt` signing key pair, made on first use (RSA generation takes a moment).
    jwt: std::sync::OnceLock<Option<Arc<webhooks::JwtSigner>>>,
}

impl Emulator {
    fn jwt(&self) -> Option<Arc<webhooks::JwtSigner>> {
        self.jwt
            .get_or_init(|| webhooks::JwtSigner::generate().map(Arc::new))
            .clone()
    }

    fn store(&self) -> MutexGuard<'_, store::Store> {
        // The store is only mutated in whole-request steps; a panic cannot leave half a batch.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn inject(self: &Arc<Self>, fault: Fault) {
        match fault {
            Fault::RefuseConnections { duration } => {
                self.net.stop_listening();
                self.net
                    .spawn(server::resume_after(Arc::clone(self), duration));
            }
            Fault::BodyLimit { max_bytes } => {
                // 0 is "no limit": a limit of 0 bytes is taken as 1 (every body is longer).
                let limit = max_bytes.map_or(0, |n| n.max(1));
                self.body_limit.store(limit, Ordering::Relaxed);
            }
            other => self.faults.push(&other),
        }
    }

    fn next_lago_id(&self) -> uuid::Uuid {
        let n = self.lago_id_counter.fetch_add(1, Ordering::Relaxed);
        // Multiplying by an odd constant is a bijection, so distinct counters stay distinct.
        let bits = self
            .lago_id_base
            .wrapping_add(u128::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835));
        uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid()
    }

    fn forget(&self, transaction_ids: &[&str]) -> usize {
        let ids: std::collections::HashSet<&str> = transaction_ids.iter().copied().collect();
        self.store().forget(&ids)
    }

    /// Reports stored events Lago's checks would flag, in an `events.errors` webhook (sent in
    /// the background) when a webhook URL is configured.
    fn report_event_errors(&self, events: &[&validate::ParsedEvent]) {
        let Some(webhook) = &self.webhook else {
            return;
        };
        let errors = webhooks::check(&self.metrics, events);
        if errors.is_null() {
            return;
        }
        let jwt = (webhook.hmac_key.is_none() && webhook.jwt)
            .then(|| self.jwt())
            .flatten();
        let issuer = format!("http://{}", self.net.addr());
        self.net.spawn(webhooks::deliver(
            webhook.clone(),
            webhooks::body(errors),
            jwt,
            issuer,
        ));
    }

    fn reset(&self) {
        self.store().clear();
        self.counters.reset();
        self.faults.clear();
        self.body_limit.store(0, Ordering::Relaxed);
    }
}

/// The whole HTTP surface: Lago's API, the control endpoints, a JSON 404 for anything else.
pub(crate) fn app_router(app: Arc<Emulator>) -> Router {
    api::routes(Arc::clone(&app))
        .merge(control::routes(app))
        .fallback(api::not_found)
        // Rails has no small body cap; batches above the default 100 events may be large.
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
}

/// A running emulator. Cheap to clone; every clone controls the same server.
#[derive(Clone)]
pub struct EmulatorHandle {
    app: Arc<Emulator>,
}

/// Binds `addr` (port 0 picks a free port) and serves in the background.
pub async fn spawn(config: EmulatorConfig, addr: SocketAddr) -> io::Result<EmulatorHandle> {
    let listener = TcpListener::bind(addr).await?;
    let net = server::Net::new(listener, tokio::runtime::Handle::current())?;
    let app = Arc::new(Emulator {
        api_key_hash: api::key_hash(&config.api_key),
        read_only_key_hash: config.read_only_api_key.as_deref().map(api::key_hash),
        batch_max_length: config.batch_max_length,
        store: Mutex::new(store::Store::new(config.store)),
        faults: faults::FaultQueue::default(),
        body_limit: std::sync::atomic::AtomicUsize::new(0),
        counters: counters::AtomicCounters::default(),
        net,
        lago_id_base: uuid::Uuid::now_v7().as_u128(),
        lago_id_counter: AtomicU64::new(0),
        known_subscriptions: config.known_subscriptions,
        metrics: config.metrics,
        webhook: config.webhook,
        jwt: std::sync::OnceLock::new(),
    });
    server::start_accepting(&app);
    Ok(EmulatorHandle { app })
}

impl EmulatorHandle {
    /// The bound address (the real port when spawned on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.app.net.addr()
    }

    /// `http://127.0.0.1:PORT` — the value for `LAGO_API_BASE` (without `/api/v1`). An unspecified
    /// bind address (0.0.0.0, ::) is given as loopback.
    pub fn base_url(&self) -> String {
        let addr = self.addr();
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, addr.port()))
    }

    /// Every stored event, in arrival order.
    pub fn events(&self) -> Vec<StoredEvent> {
        self.app.store().snapshot(0, usize::MAX)
    }

    /// How many events are stored (cheaper than `events().len()`).
    pub fn event_count(&self) -> usize {
        self.app.store().len()
    }

    pub fn counters(&self) -> Counters {
        self.app.counters.snapshot()
    }

    /// Queues a fault for the next Lago API requests (or, for `RefuseConnections`, acts now).
    pub fn inject(&self, fault: Fault) {
        self.app.inject(fault);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.app.faults.clear();
    }

    /// Requests still to be served a queued fault.
    pub fn pending_faults(&self) -> usize {
        self.app.faults.pending()
    }

    /// Forgets the stored events with these transaction_ids, as if Lago had lost them (to test
    /// `tally audit`); returns how many were stored.
    pub fn forget(&self, transaction_ids: &[&str]) -> usize {
        self.app.forget(transaction_ids)
    }

    /// Forgets stored events, counters and queued faults.
    pub fn reset(&self) {
        self.app.reset();
    }

    /// Closes the listening socket (connections are refused from the moment this returns) and
    /// every open connection (at once, asynchronously; in-flight requests get no answer).
    pub fn stop_listening(&self) {
        self.app.net.stop_listening();
    }

    /// Listens again on the same address.
    pub async fn resume_listening(&self) -> io::Result<()> {
        server::resume_listening(&self.app).await
    }

    /// Stops listening, closes every connection, waits for the server's tasks to finish.
    pub async fn shutdown(self) {
        self.app.net.shutdown().await;
    }
}

/// `tally lago-emulator`: serve `config` on `addr` until `shutdown` is cancelled. Prints the base
/// URL on stdout.
pub async fn run(
    config: EmulatorConfig,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = config.store;
    let handle = spawn(config, addr).await.with_context(|| {
        format!("cannot listen on {addr}; is another process using it? choose another --port")
    })?;
    tracing::info!(
        base_url = %handle.base_url(),
        store = ?store,
        "lago emulator listening; control endpoints under /_emulator/"
    );
    // For a script reading the URL; one that stops reading must not end the emulator.
    let _ = writeln!(io::stdout(), "{}", handle.base_url());
    shutdown.cancelled().await;
    handle.shutdown().await;
    Ok(())
}
