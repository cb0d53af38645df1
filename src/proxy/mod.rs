//! `tally proxy`: a LiteLLM-compatible, OpenAI-compatible proxy that appends one spend record per
//! completed request to the spend log.
//!
//! The map:
//! - [`config`]: LiteLLM's config.yaml, `tally_settings`, `TALLY_*` overrides, master-key checks.
//! - [`pricing`]: per-token prices (built-in table, price file, per-deployment overrides).
//! - [`keys`]: virtual keys: minting, hashing, the record a key carries.
//! - [`keystore`]: where keys live (SQLite `keys.db`, or PostgreSQL shared by replicas) and the
//!   in-memory cache that keeps the database off the request path.
//! - [`auth`]: which key a request carries and who that makes the caller.
//! - [`end_user`]: the end-user id a call bills, and a key's guard on which it may bill.
//! - [`limits`]: bounds on every client-controlled field, so every record stays billable.
//! - [`request`]: reading a JSON body with the size limit and content-type check.
//! - [`json_body`]: a relayed body's members located and substituted without a `Value` tree.
//! - [`server`]: accepting connections under a limit; header, body and idle timeouts.
//! - [`routes`]: the router: health, models, and wiring of the handlers below.
//! - [`key_api`]: `/key/generate`, `/key/info`, `/key/delete`, `/key/update`, `/key/regenerate`,
//!   `/key/list`, `/key/block`, `/key/unblock`.
//! - [`provider`]: what `model: <provider>/<model>` means: URL, auth header, defaults.
//! - [`router`]: model groups, simple-shuffle, retries, cooldown, fallbacks, wildcards.
//! - [`relay`]: `/chat/completions`, `/embeddings`, Anthropic's `/v1/messages` (and
//!   `count_tokens`), OpenAI's `/v1/responses`: resolve, forward, record.
//! - [`stored_responses`]: `GET`/`DELETE /v1/responses/{id}`, relayed and not billed.
//! - [`anthropic_chat`]: `/chat/completions` to `anthropic/` translated to the Messages API and back.
//! - [`stream`]: relaying server-sent events while picking out the usage.
//! - [`upstream`]: calls to upstreams over kept-alive connections the calling task drives, and
//!   the mapping of transport failures.
//! - [`mock`]: local answers for `mock_response` deployments.
//! - [`usage`]: the upstream's token usage, every provider's shape, read into one form.
//! - [`tokens`]: the token estimate used when an upstream reports no usage.
//! - [`files`]: keeping what the proxy owns on disk private (no symlinked log, no open state dir).
//! - [`spend_writer`]: the spend log: one line per append under a lock, rotation.
//! - [`error`]: the OpenAI-shaped error every handler answers with.
//! - [`observe`]: Prometheus metrics of relayed requests, and `/metrics`.

pub mod anthropic_chat;
pub mod auth;
pub mod config;
pub mod end_user;
pub mod error;
pub mod files;
pub mod json_body;
pub mod key_api;
pub mod keys;
pub mod keystore;
pub mod limits;
pub mod mock;
pub mod observe;
pub mod pricing;
pub mod provider;
pub mod relay;
pub mod request;
pub mod router;
pub mod routes;
pub mod server;
pub mod spend_writer;
pub mod stored_responses;
pub mod stream;
pub mod tokens;
pub mod upstream;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Exposition, ProxyMetrics, Registry};
use crate::service;

pub use config::{ConfigError, Deployment, ProxyConfig, TallySettings};
pub use routes::app;

use auth::Authenticator;
use keystore::{CacheSettings, KeyStore};
use pricing::{Price, PriceTable};
use provider::CallKind;
use router::{Group, Groups, RouterSettings};
use spend_writer::SpendWriter;
use upstream::{Endpoint, UpstreamClient};

/// How long shutdown waits for in-flight streams before flushing the spend log anyway.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// A deployment with everything a request needs precomputed.
#[derive(Debug)]
pub struct Route {
    pub deployment: Deployment,
    pub price: Option<Price>,
    pub chat: Endpoint,
    pub embeddings: Endpoint,
    pub messages: Endpoint,
    pub count_tokens: Endpoint,
    pub responses: Endpoint,
    /// Recent failures, for cooldown (only read in groups of several).
    pub health: router::Health,
    /// The model is a wildcard (`openai/*`): the upstream model and price are worked out per call.
    pub wildcard: bool,
    /// The call types the deployment's provider answers, by [`CallKind`] (looked up once here,
    /// not per request).
    answers: [bool; 5],
    /// An `anthropic/` deployment: chat calls are translated to the Messages API.
    pub anthropic: bool,
}

impl Route {
    fn new(d: &Deployment, prices: &PriceTable) -> Self {
        Self {
            deployment: d.clone(),
            price: price_of(d, prices),
            chat: Endpoint::new(d, CallKind::Chat),
            embeddings: Endpoint::new(d, CallKind::Embeddings),
            messages: Endpoint::new(d, CallKind::Messages),
            count_tokens: Endpoint::new(d, CallKind::CountTokens),
            responses: Endpoint::new(d, CallKind::Responses),
            health: router::Health::default(),
            wildcard: d.upstream_model.contains('*'),
            answers: CallKind::ALL.map(|k| provider::of(d).supports(k)),
            anthropic: provider::of(d).name() == "anthropic",
        }
    }

    /// Whether the deployment's provider answers `call`.
    pub fn answers(&self, call: CallKind) -> bool {
        self.answers[call as usize]
    }

    /// The endpoint of a call type on this deployment.
    pub fn endpoint(&self, call: CallKind) -> &Endpoint {
        match call {
            CallKind::Chat => &self.chat,
            CallKind::Embeddings => &self.embeddings,
            CallKind::Messages => &self.messages,
            CallKind::CountTokens => &self.count_tokens,
            CallKind::Responses => &self.responses,
        }
    }
}

/// A deployment's price. An Azure deployment's name is the operator's own: it is priced as its
/// `model_info.base_model` (or only by its own per-token prices when it has none).
pub fn price_of(d: &Deployment, prices: &PriceTable) -> Option<Price> {
    if d.provider != "azure" {
        return prices.price_for(d);
    }
    let base = d.base_model.clone().unwrap_or_default();
    // `azure/gpt-4o` as LiteLLM's docs write it; a price table may list it as `gpt-4o` only.
    let bare = base.strip_prefix("azure/").unwrap_or(&base).to_owned();
    prices.price_for(&Deployment {
        model_name: bare,
        upstream_model: base,
        ..d.clone()
    })
}

/// Shared state of the proxy; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    groups: Groups,
    router: RouterSettings,
    /// For wildcard deployments, priced per call by the model the request named.
    prices: PriceTable,
    /// Model names in config order, for `/models` and error messages.
    model_names: Vec<String>,
    /// The first deployment (in config order) that answers the Responses API: where
    /// `GET`/`DELETE /v1/responses/{id}` go when the request names no `?model=`.
    responses_default: Option<Arc<Route>>,
    auth: Authenticator,
    spend: SpendWriter,
    upstream: UpstreamClient,
    max_body_bytes: usize,
    /// Calls and stream relays still running; shutdown waits for them before flushing the
    /// spend log.
    in_flight: TaskTracker,
    metrics: ProxyMetrics,
    exposition: Exposition,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Prices(#[from] pricing::PriceFileError),
    #[error(transparent)]
    Keys(#[from] keystore::KeyStoreError),
    #[error(transparent)]
    SpendLog(#[from] spend_writer::SpendLogError),
    #[error(transparent)]
    Http(#[from] upstream::ClientError),
}

impl AppState {
    /// Opens the key store and the spend log and prepares every deployment.
    pub async fn new(config: &ProxyConfig) -> Result<Self, StartError> {
        let prices = PriceTable::load(config.settings.price_file.as_deref())?;
        let keys = open_keys(config).await?;
        let spend = SpendWriter::open(
            &config.settings.spend_log,
            config.settings.spend_log_max_bytes,
        )?;
        let mut groups: Vec<(String, Vec<Arc<Route>>)> = Vec::new();
        let mut unpriced = Vec::new();
        let mut responses_default = None;
        let mut azure_unpriced = Vec::new();
        for d in &config.deployments {
            let route = Arc::new(Route::new(d, &prices));
            if responses_default.is_none()
                && d.mock_response.is_none()
                && provider::of(d).supports(CallKind::Responses)
            {
                responses_default = Some(route.clone());
            }
            if route.price.is_none() && !route.wildcard {
                let list = if d.provider == "azure" && d.base_model.is_none() {
                    &mut azure_unpriced
                } else {
                    &mut unpriced
                };
                if !list.contains(&d.model_name.as_str()) {
                    list.push(d.model_name.as_str());
                }
            }
            match groups.iter_mut().find(|(name, _)| *name == d.model_name) {
                Some((_, routes)) => routes.push(route),
                None => groups.push((d.model_name.clone(), vec![route])),
            }
        }
        if !azure_unpriced.is_empty() {
            tracing::warn!(
                models = ?azure_unpriced,
                "Azure deployments without model_info.base_model are unpriced (a deployment's name \
                 says nothing about the model it runs): their spend records carry response_cost \
                 null; set model_info.base_model, e.g. base_model: azure/gpt-4o"
            );
        }
        if let Some(strategy) = &config.router.unsupported_strategy {
            tracing::warn!(
                strategy,
                "router_settings.routing_strategy {strategy:?} is not supported; tally routes \
                 with simple-shuffle (random, weighted by weight / rpm / tpm)"
            );
        }
        let groups = Groups::new(
            groups
                .into_iter()
                .map(|(name, routes)| Arc::new(Group::new(name, routes)))
                .collect(),
            &config.router.aliases,
        );
        if !unpriced.is_empty() {
            tracing::warn!(
                models = ?unpriced,
                "no price known for these models: their spend records carry response_cost null; \
                 set input_cost_per_token/output_cost_per_token or tally_settings.price_file"
            );
        }
        for entry in &config.unapplied_params {
            tracing::warn!(
                "{entry}: these litellm_params are not applied by tally (it forwards the client's \
                 request as sent, with the deployment's model, key and URL)"
            );
        }
        for callback in &config.unsupported_callbacks {
            tracing::warn!(
                callback,
                "litellm_settings callback {callback:?} is not supported by tally and is ignored; \
                 only \"lago\" is (billing is done by `tally ship` from the spend log)"
            );
        }
        let mut registry = Registry::default();
        crate::metrics::register_build_info(&mut registry);
        let mut model_names = config.model_names();
        model_names.extend(
            config
                .router
                .aliases
                .iter()
                .filter(|a| !a.hidden)
                .map(|a| a.alias.clone()),
        );
        let metrics = ProxyMetrics::register(&mut registry, model_names.iter().cloned());
        Ok(Self {
            inner: Arc::new(Shared {
                groups,
                router: config.router.clone(),
                prices,
                model_names,
                responses_default,
                auth: Authenticator::new(config.master_key.as_deref(), keys),
                spend,
                upstream: UpstreamClient::new()?,
                max_body_bytes: config.settings.max_body_bytes,
                in_flight: TaskTracker::new(),
                metrics,
                exposition: registry.into(),
            }),
        })
    }

    /// The group serving a requested model name (exact, else by wildcard).
    pub fn resolve<'a>(&'a self, model: &'a str) -> Option<router::Target<'a>> {
        self.inner.groups.resolve(model)
    }

    /// The group named `name` exactly (fallback targets).
    pub fn group(&self, name: &str) -> Option<&Arc<Group>> {
        self.inner.groups.get(name)
    }

    pub fn router(&self) -> &RouterSettings {
        &self.inner.router
    }

    pub fn prices(&self) -> &PriceTable {
        &self.inner.prices
    }

    pub fn responses_default(&self) -> Option<&Arc<Route>> {
        self.inner.responses_default.as_ref()
    }

    pub fn model_names(&self) -> &[String] {
        &self.inner.model_names
    }

    pub fn auth(&self) -> &Authenticator {
        &self.inner.auth
    }

    pub fn spend(&self) -> &SpendWriter {
        &self.inner.spend
    }

    pub fn upstream(&self) -> &UpstreamClient {
        &self.inner.upstream
    }

    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    pub fn in_flight(&self) -> &TaskTracker {
        &self.inner.in_flight
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.inner.metrics
    }

    pub fn exposition(&self) -> &Exposition {
        &self.inner.exposition
    }

    /// Waits for calls still running (up to a deadline), then flushes and closes the spend log.
    pub async fn shutdown(&self) {
        self.inner.in_flight.close();
        if tokio::time::timeout(DRAIN_DEADLINE, self.inner.in_flight.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "calls still running after {DRAIN_DEADLINE:?}; closing the spend log without them"
            );
        }
        self.inner.spend.close().await;
    }
}

/// The key store the configuration names (PostgreSQL when `database_url` is set), with its
/// cache; every key is revalidated on the configured interval once the proxy serves.
pub async fn open_keys(config: &ProxyConfig) -> Result<KeyStore, keystore::KeyStoreError> {
    let backend =
        keystore::open_backend(config.database_url.as_deref(), &config.settings.state_dir).await?;
    Ok(KeyStore::new(
        backend,
        CacheSettings {
            revalidate: config.settings.key_revalidate,
            outage_grace: config.settings.key_outage_grace,
        },
    ))
}

/// `tally proxy`: binds `address` (`host:port`), serves until `shutdown`, then drains and flushes.
pub async fn run(
    config: ProxyConfig,
    address: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}; choose another --port / --host"))?;
    serve(config, listener, shutdown).await
}

/// Serves the proxy on `listener` until `shutdown` is cancelled; returns once in-flight requests
/// are done (or the drain deadline passed) and the spend log is flushed.
pub async fn serve(
    config: ProxyConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AppState::new(&config)
        .await
        .with_context(|| format!("cannot start the proxy with {}", config.source))?;
    let local = listener
        .local_addr()
        .context("listener has no local address")?;
    tracing::info!(
        address = %local,
        models = ?state.model_names(),
        spend_log = %config.settings.spend_log.display(),
        state_dir = %config.settings.state_dir.display(),
        "tally proxy listening"
    );
    let router = app(state.clone());
    // Bound, key store and spend log open: ready. The watchdog pings while both stay usable.
    service::notify_status(&format!("listening on {local}"));
    service::notify_ready();
    let watchdog = service::spawn_watchdog(shutdown.clone(), {
        let state = state.clone();
        move || state.spend().is_healthy() && state.auth().keys().is_usable()
    });
    let revalidation = state.auth().keys().spawn_revalidation(shutdown.clone());
    let stopping = shutdown.clone();
    let notify_stopping = tokio::spawn(async move {
        stopping.cancelled().await;
        service::notify_stopping();
    });
    server::serve(listener, router, config.settings.server, shutdown.clone()).await;
    let _ = notify_stopping.await;
    if let Some(watchdog) = watchdog {
        let _ = watchdog.await;
    }
    let _ = revalidation.await;
    state.shutdown().await;
    tracing::info!("tally proxy stopped; spend log flushed");
    Ok(())
}
