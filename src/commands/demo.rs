//! `tally demo`: the whole pipeline in one process, on loopback, with nothing to configure and no
//! network: the proxy's mock models, the proxy, the shipper and the Lago emulator, each on a free
//! port. It creates a team key and a user key through the proxy's HTTP API, sends LiteLLM's three
//! billing flows (team key; end user via `user`; user key), waits until Lago has every event and
//! prints, per customer, what Lago received.
//!
//! The services are the real ones (`proxy::serve`, `ship::run_with`, `lago_emulator::spawn`);
//! only their configuration is built here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::{DemoArgs, OutputFormat};
use crate::commands::output;
use crate::commands::replay::summary::CustomerTotals;
use crate::lago_emulator::{EmulatorConfig, EmulatorHandle, Metric, StoredEvent, WebhookConfig};
use crate::proxy::ProxyConfig;
use crate::ship::ShipSettings;
use crate::ship::settings::ApiKey;

/// The billable metric code the demo's events carry.
pub const EVENT_CODE: &str = "llm_usage";
/// Every flow is billable with this fallback list: an end user wins, then the key's user, then
/// the key's team (LiteLLM's default, `end_user_id` alone, would hold the team-key flow).
pub const CHARGE_BY: &str = "end_user_id,user_id,team_id";
/// Requests per flow.
const REQUESTS_PER_FLOW: usize = 3;
/// The property the demo's billable metric (on [`EVENT_CODE`]) sums.
const LAGO_METRIC_PROPERTY: &str = "total_tokens";
/// How long the demo waits for Lago to have every event (generous: a loaded machine is fine).
const DELIVERY_WAIT: Duration = Duration::from_secs(60);

/// The demo's own proxy configuration: two mock models, one priced by the built-in table and
/// one by its own per-token prices. The master key is generated per run.
fn proxy_yaml(master_key: &str) -> String {
    format!(
        r#"model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      mock_response: "Hello from the tally mock model!"
  - model_name: house-model
    litellm_params:
      model: openai/house-model
      mock_response: "This answer was priced by the deployment's own prices."
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000002
litellm_settings:
  callbacks: ["lago"]
general_settings:
  master_key: "{master_key}"
"#
    )
}

/// One of LiteLLM's billing flows, as the demo sends it.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub name: &'static str,
    pub how: &'static str,
    /// Who Lago charges (`external_subscription_id`).
    pub customer: String,
    /// The `x-litellm-call-id` of every request (= the events' transaction_id).
    pub transaction_ids: Vec<String>,
}

/// What `tally demo --output-format json` prints.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub proxy_url: String,
    pub lago_url: String,
    pub charge_by: &'static str,
    pub flows: Vec<Flow>,
    /// What the Lago emulator stored, per customer.
    pub customers: Vec<CustomerTotals>,
    pub events_received: usize,
    pub spend_log: String,
    pub state_dir: String,
    /// `tally audit` run at the end: Lago has every acked event as sent.
    pub audit: crate::commands::audit::AuditReport,
    /// The billable metric the emulator checks every stored event against (`CODE:PROPERTY`);
    /// events it cannot bill come back in HMAC-signed `events.errors` webhooks.
    pub lago_metric: String,
    /// Events Lago reported in `events.errors` webhooks, moved to `lago-error` (0 when the
    /// metric matches what tally sends).
    pub lago_errors: u64,
}

pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let dir = prepare_dir(args.dir.as_deref())?;
    let report = run_demo(&dir, &shutdown).await?;
    match args.output_format {
        OutputFormat::Json => output::print_json(&report)?,
        OutputFormat::Text => output::print_text(&render(&report))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A fresh directory: `--dir` (created, and refused if it holds files already, so the totals
/// are this run's), or a new one under the system temp dir, kept so it can be inspected.
fn prepare_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!(
            "tally-demo-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        )),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the demo directory {}", dir.display()))?;
    let not_empty = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read the demo directory {}", dir.display()))?
        .next()
        .is_some();
    if not_empty {
        bail!(
            "the demo directory {} is not empty; give an empty or new --dir",
            dir.display()
        );
    }
    Ok(dir)
}

/// The running services; stopped in reverse order.
struct Services {
    emulator: EmulatorHandle,
    proxy_url: String,
    /// Generated for this run; only in memory and in the proxy's config.
    master_key: String,
    /// The emulator's key, for the closing audit.
    lago_key: String,
    stop: CancellationToken,
    proxy: JoinHandle<anyhow::Result<()>>,
    shipper: JoinHandle<anyhow::Result<()>>,
}

impl Services {
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let proxy = self.proxy.await.context("the proxy task failed")?;
        let shipper = self.shipper.await.context("the shipper task failed")?;
        self.emulator.shutdown().await;
        proxy.context("the proxy failed")?;
        shipper.context("the shipper failed")?;
        Ok(())
    }
}

async fn start(dir: &Path, shutdown: &CancellationToken) -> anyhow::Result<Services> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let spend_log = dir.join("spend.jsonl");
    let state_dir = dir.join("state");

    let lago_key = format!("lago-demo-{}", hex::encode(rand::random::<[u8; 16]>()));
    // The `events.errors` loop, as in production: the emulator checks each stored event
    // against a billable metric and reports the ones it cannot bill in HMAC-signed webhooks to
    // the shipper's receiver, which moves them to `lago-error`.
    let webhook_key = format!("whsec-demo-{}", hex::encode(rand::random::<[u8; 16]>()));
    // Bound here and handed to the shipper, not found free and bound again: on a busy machine
    // another socket can take a released port first, and the shipper would not start.
    let webhook_listener = std::net::TcpListener::bind(loopback)
        .context("cannot bind a loopback port for the shipper's webhook receiver")?;
    let webhook_addr = webhook_listener
        .local_addr()
        .context("cannot read the webhook receiver's loopback port")?;
    let emulator = crate::lago_emulator::spawn(
        EmulatorConfig {
            api_key: lago_key.clone(),
            metrics: vec![Metric {
                code: EVENT_CODE.to_owned(),
                field_name: Some(LAGO_METRIC_PROPERTY.to_owned()),
            }],
            webhook: Some(WebhookConfig {
                url: format!("http://{webhook_addr}/lago/webhooks"),
                hmac_key: Some(webhook_key.clone()),
                jwt: false,
            }),
            ..EmulatorConfig::default()
        },
        loopback,
    )
    .await
    .context("cannot start the Lago emulator on a loopback port")?;

    let master_key = format!("sk-{}", hex::encode(rand::random::<[u8; 24]>()));
    let config =
        ProxyConfig::from_yaml_str(&proxy_yaml(&master_key), "tally demo's built-in config")
            .context("the demo's proxy config is invalid")?
            .with_spend_log(&spend_log)
            .with_state_dir(&state_dir);
    let listener = tokio::net::TcpListener::bind(loopback)
        .await
        .context("cannot bind a loopback port for the proxy")?;
    let proxy_url = format!("http://{}", listener.local_addr()?);
    let stop = shutdown.child_token();
    let proxy = tokio::spawn(crate::proxy::serve(config, listener, stop.clone()));

    let mut settings = ShipSettings::new(
        &spend_log,
        &state_dir,
        &emulator.base_url(),
        ApiKey::new(lago_key.clone()),
        EVENT_CODE,
    )
    .context("the demo's shipper settings are invalid")?;
    settings.lago.spec.charge_by = CHARGE_BY
        .parse()
        .map_err(|e| anyhow::anyhow!("the demo's charge-by is invalid: {e}"))?;
    // Quick to notice new lines even where file events are slow to arrive.
    settings.tuning.poll_interval = Duration::from_millis(100);
    settings.webhook = Some(crate::ship::webhook::WebhookSettings {
        addr: webhook_addr,
        hmac_key: Some(ApiKey::new(webhook_key)),
        listener: Some(std::sync::Arc::new(webhook_listener)),
    });
    let shipper = tokio::spawn(crate::ship::run_with(settings, stop.clone()));

    let services = Services {
        emulator,
        proxy_url,
        master_key,
        lago_key,
        stop,
        proxy,
        shipper,
    };
    Ok(services)
}

async fn run_demo(dir: &Path, shutdown: &CancellationToken) -> anyhow::Result<DemoReport> {
    let services = start(dir, shutdown).await?;
    let outcome = drive(&services, dir).await;
    // Stop the services whatever happened. A service that failed is why the drive failed (a
    // shipper that could not start delivers nothing), so its error is reported first.
    services.stop().await?;
    outcome
}

/// Creates the keys, sends the flows, waits for Lago, tallies what it stored.
async fn drive(services: &Services, dir: &Path) -> anyhow::Result<DemoReport> {
    let master_key = &services.master_key;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let proxy = Proxy {
        http: &http,
        base: &services.proxy_url,
    };
    proxy.wait_ready(services, master_key).await?;

    let team_key = proxy
        .generate_key(
            master_key,
            json!({"team_id": "team-acme", "key_alias": "acme-team-key"}),
        )
        .await?;
    let user_key = proxy
        .generate_key(
            master_key,
            json!({"user_id": "user-dana", "key_alias": "dana-key"}),
        )
        .await?;

    let mut flows = vec![
        Flow {
            name: "team key",
            how: "with a key of team-acme",
            customer: "team-acme".into(),
            transaction_ids: Vec::new(),
        },
        Flow {
            name: "end user",
            how: "with that key and \"user\": \"customer-7\"",
            customer: "customer-7".into(),
            transaction_ids: Vec::new(),
        },
        Flow {
            name: "user key",
            how: "with a key of user-dana",
            customer: "user-dana".into(),
            transaction_ids: Vec::new(),
        },
    ];
    // Vary model and prompt per flow so the customers' totals differ.
    let models = ["gpt-4o", "house-model"];
    let keys = [&team_key, &team_key, &user_key];
    let users = [None, Some("customer-7"), None];
    for i in 0..REQUESTS_PER_FLOW {
        for (f, flow) in flows.iter_mut().enumerate() {
            let model = models[(i + f) % models.len()];
            let prompt = format!(
                "Request {} of the {} flow: please say hello{}",
                i + 1,
                flow.name,
                " again".repeat(f)
            );
            let id = proxy.chat(keys[f], model, &prompt, users[f]).await?;
            flow.transaction_ids.push(id);
        }
    }

    let expected: Vec<&str> = flows
        .iter()
        .flat_map(|f| f.transaction_ids.iter().map(String::as_str))
        .collect();
    let state_dir = dir.join("state");
    let events = wait_for_events(services, &state_dir, &expected).await?;
    let audit = audit_delivery(services, &state_dir, expected.len()).await?;
    let lago_errors = crate::ship::outbox::Outbox::open_read_only_in(&state_dir)?
        .map(|ob| ob.stats().map(|s| s.lago_error))
        .transpose()?
        .unwrap_or(0);
    Ok(DemoReport {
        proxy_url: services.proxy_url.clone(),
        lago_url: services.emulator.base_url(),
        charge_by: CHARGE_BY,
        flows,
        customers: per_customer(&events),
        events_received: events.len(),
        spend_log: dir.join("spend.jsonl").display().to_string(),
        state_dir: state_dir.display().to_string(),
        audit,
        lago_metric: format!("{EVENT_CODE}:{LAGO_METRIC_PROPERTY}"),
        lago_errors,
    })
}

/// Once every event is acked, `tally audit` over the outbox: Lago has each as sent.
async fn audit_delivery(
    services: &Services,
    state_dir: &Path,
    expected: usize,
) -> anyhow::Result<crate::commands::audit::AuditReport> {
    use crate::ship::outbox::{AuditScope, Outbox};
    let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
    loop {
        let acked = Outbox::open_read_only_in(state_dir)?
            .map(|ob| ob.stats().map(|s| s.acked))
            .transpose()?
            .unwrap_or(0);
        if acked as usize >= expected {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the shipper acked {acked} of {expected} events within {} s",
                DELIVERY_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outbox = Outbox::open_in(state_dir)?.shared();
    let base = reqwest::Url::parse(&services.emulator.base_url())?;
    let mut reader = crate::ship::lago_read::LagoReader::new(&base, &services.lago_key, 200.0)?;
    let scope = AuditScope {
        since_ms: None,
        until_ms: None,
        sample: None,
    };
    crate::commands::audit::audit(
        &outbox,
        &mut reader,
        &scope,
        None,
        &CancellationToken::new(),
    )
    .await?
    .context("the closing audit was interrupted")
}

struct Proxy<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
}

impl Proxy<'_> {
    /// Waits until the proxy answers its readiness check (it opens its key store and spend log
    /// first), failing fast if it stopped.
    async fn wait_ready(&self, services: &Services, master_key: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if services.proxy.is_finished() {
                bail!("the proxy stopped during start-up; run with RUST_LOG=info to see why");
            }
            let url = format!("{}/health/readiness", self.base);
            if let Ok(r) = self.http.get(&url).bearer_auth(master_key).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the proxy at {} did not become ready within 30 s",
                    self.base
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn generate_key(&self, master_key: &str, body: Value) -> anyhow::Result<String> {
        let r = self
            .http
            .post(format!("{}/key/generate", self.base))
            .bearer_auth(master_key)
            .json(&body)
            .send()
            .await
            .context("POST /key/generate failed")?;
        let status = r.status();
        let answer: Value = r.json().await.context("/key/generate answered no JSON")?;
        if !status.is_success() {
            bail!("/key/generate answered {status}: {answer}");
        }
        answer["key"]
            .as_str()
            .map(str::to_owned)
            .context("/key/generate answered without a key")
    }

    /// One chat completion; returns its `x-litellm-call-id` (the event's transaction_id).
    async fn chat(
        &self,
        key: &str,
        model: &str,
        prompt: &str,
        user: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
        if let Some(user) = user {
            body["user"] = Value::String(user.to_owned());
        }
        let r = self
            .http
            .post(format!("{}/chat/completions", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .context("POST /chat/completions failed")?;
        let status = r.status();
        let call_id = r
            .headers()
            .get("x-litellm-call-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = r.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("/chat/completions ({model}) answered {status}: {text}");
        }
        call_id.context("/chat/completions answered without x-litellm-call-id")
    }
}

/// Waits until the emulator holds every expected transaction_id (bounded), then returns what it
/// stored.
async fn wait_for_events(
    services: &Services,
    state_dir: &Path,
    expected: &[&str],
) -> anyhow::Result<Vec<StoredEvent>> {
    let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
    loop {
        // Either service stopping early means nothing more will arrive: stop waiting (its error
        // is reported when it is stopped).
        for (name, task) in [("shipper", &services.shipper), ("proxy", &services.proxy)] {
            if task.is_finished() {
                bail!("the demo's {name} stopped before Lago had every event");
            }
        }
        let events = services.emulator.events();
        let missing: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|id| !events.iter().any(|e| e.transaction_id == *id))
            .collect();
        if missing.is_empty() {
            // Exactly once: the emulator stores nothing twice, and nothing else was sent.
            if events.len() != expected.len() {
                bail!(
                    "Lago has {} events for {} requests; expected exactly one per request",
                    events.len(),
                    expected.len()
                );
            }
            return Ok(events);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "Lago has {} of {} events after {} s; missing: {}. {} The spend log and the \
                 outbox are kept: inspect them with `tally queue stats --state-dir <dir>/state`",
                expected.len() - missing.len(),
                expected.len(),
                DELIVERY_WAIT.as_secs(),
                missing.join(", "),
                outbox_summary(state_dir)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the shipper got to, for the error when Lago is missing events: whether it read the
/// spend log at all, and what Lago last answered.
fn outbox_summary(state_dir: &Path) -> String {
    match crate::ship::outbox::Outbox::open_read_only_in(state_dir).map(|ob| ob.map(|o| o.stats()))
    {
        Ok(Some(Ok(s))) => format!(
            "The shipper's outbox has {} pending ({} in flight), {} acked, {} dead, {} rejected \
             lines; Lago's last error: {}.",
            s.pending,
            s.in_flight,
            s.acked,
            s.dead,
            s.rejected,
            s.last_lago_error.map_or("none".to_owned(), |e| e.message)
        ),
        Ok(None) => "The shipper made no outbox.".to_owned(),
        Ok(Some(Err(e))) | Err(e) => format!("The shipper's outbox cannot be read: {e}."),
    }
}

/// Events, tokens and cost per `external_subscription_id`, from what Lago stored.
pub fn per_customer(events: &[StoredEvent]) -> Vec<CustomerTotals> {
    let mut by: BTreeMap<String, CustomerTotals> = BTreeMap::new();
    for e in events {
        let customer = e
            .external_subscription_id
            .clone()
            .unwrap_or_else(|| "(none)".to_owned());
        let t = by
            .entry(customer.clone())
            .or_insert_with(|| CustomerTotals {
                customer,
                ..CustomerTotals::default()
            });
        let n = |k: &str| e.properties.get(k).and_then(Value::as_u64).unwrap_or(0);
        t.events += 1;
        t.input_tokens += n("input_tokens");
        t.output_tokens += n("output_tokens");
        t.total_tokens += n("total_tokens");
        t.cost_usd += e
            .properties
            .get("response_cost")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
    }
    by.into_values().collect()
}

fn render(r: &DemoReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "tally demo: mock model → proxy → spend log → shipper → Lago, all on loopback\n"
    );
    let _ = writeln!(s, "  proxy          {}", r.proxy_url);
    let _ = writeln!(s, "  Lago emulator  {}", r.lago_url);
    let _ = writeln!(
        s,
        "  charge by      LAGO_API_CHARGE_BY={} (the first id a record has wins,\n                 so all three flows below are billable)\n",
        r.charge_by
    );
    let _ = writeln!(s, "Sent LiteLLM's three billing flows through the proxy:");
    for (i, f) in r.flows.iter().enumerate() {
        let what = format!("{} requests {}", f.transaction_ids.len(), f.how);
        let _ = writeln!(s, "  {}. {:<9} {what:<49} → {}", i + 1, f.name, f.customer);
    }
    let _ = writeln!(
        s,
        "\nWhat Lago received, per customer (external_subscription_id):"
    );
    let _ = writeln!(s, "{}", CustomerTotals::table(&r.customers));
    let _ = writeln!(
        s,
        "Lago has all {} events, each exactly once.\n",
        r.events_received
    );
    let _ = writeln!(
        s,
        "tally audit: checked {} acked events against Lago: {} missing, {} different, {} unknown subscriptions.\n",
        r.audit.checked,
        r.audit.missing,
        r.audit.different,
        r.audit.unknown_subscriptions.len()
    );
    let _ = writeln!(
        s,
        "Lago's events.errors webhooks (HMAC-signed, metric {}): {} events Lago cannot bill.\n",
        r.lago_metric, r.lago_errors
    );
    let _ = writeln!(s, "  spend log  {}", r.spend_log);
    let _ = writeln!(
        s,
        "  state      {} (keys.db, shipper.db)\n             try: tally queue stats --state-dir {}",
        r.state_dir, r.state_dir
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(id: &str, sub: Option<&str>, props: Value) -> StoredEvent {
        StoredEvent {
            lago_id: id.into(),
            transaction_id: id.into(),
            external_subscription_id: sub.map(Into::into),
            code: EVENT_CODE.into(),
            timestamp_millis: 0,
            properties: props.as_object().cloned().unwrap_or_default(),
            precise_total_amount_cents: None,
            received_at_millis: 0,
        }
    }

    #[test]
    fn totals_per_customer_come_from_the_stored_properties() {
        let events = [
            stored(
                "a",
                Some("team-acme"),
                json!({"input_tokens": 10, "output_tokens": 5, "total_tokens": 15, "response_cost": 0.5}),
            ),
            stored(
                "b",
                Some("team-acme"),
                json!({"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}),
            ),
            stored("c", None, json!({"input_tokens": 4})),
        ];
        let t = per_customer(&events);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].customer, "(none)");
        assert_eq!(t[1].customer, "team-acme");
        assert_eq!(
            (
                t[1].events,
                t[1].input_tokens,
                t[1].output_tokens,
                t[1].total_tokens
            ),
            (2, 11, 7, 18)
        );
        assert!((t[1].cost_usd - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_built_in_config_is_accepted_by_the_proxy() {
        let key = format!("sk-{}", "a1".repeat(24));
        let config = ProxyConfig::from_yaml_str(&proxy_yaml(&key), "test").unwrap();
        let names: Vec<_> = config
            .deployments
            .iter()
            .map(|d| d.model_name.as_str())
            .collect();
        assert_eq!(names, ["gpt-4o", "house-model"]);
        assert!(config.deployments.iter().all(|d| d.mock_response.is_some()));
    }

    #[test]
    fn a_non_empty_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(prepare_dir(Some(dir.path())).is_ok());
        std::fs::write(dir.path().join("x"), b"").unwrap();
        let err = prepare_dir(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }
}
