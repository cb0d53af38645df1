//! LiteLLM's router, the part tally implements: model groups (several deployments under one
//! `model_name`) chosen by `simple-shuffle`, retries on another deployment, cooldown of failing
//! deployments, fallbacks to other groups, and wildcard model names.
//!
//! Everything is laid out at start-up; a group of one deployment is picked without a random
//! number, a clock read or an atomic.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::Route;
use super::error::ProxyError;

/// LiteLLM's `Router` defaults (`litellm/constants.py`: `DEFAULT_MAX_RETRIES`,
/// `DEFAULT_ALLOWED_FAILS`, `DEFAULT_COOLDOWN_TIME_SECONDS`).
pub const DEFAULT_NUM_RETRIES: u32 = 2;
pub const DEFAULT_ALLOWED_FAILS: u32 = 3;
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);

/// `router_settings` (or their `litellm_settings` equivalents), validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    /// Further attempts after the first, within a group.
    pub num_retries: u32,
    /// Failures of a deployment within a minute before it is cooled down.
    pub allowed_fails: u32,
    pub cooldown: Duration,
    /// `[{"gpt-4o": ["gpt-4o-mini"]}]`: groups tried, in order, when a group is exhausted. The key
    /// `*` applies to every group without its own entry.
    pub fallbacks: HashMap<String, Vec<String>>,
    /// Tried instead when the upstream says the prompt is longer than its context window.
    pub context_window_fallbacks: HashMap<String, Vec<String>>,
    /// Tried instead when the upstream refuses the content (e.g. Azure's `content_filter`).
    pub content_policy_fallbacks: HashMap<String, Vec<String>>,
    /// `model_group_alias`: other names for groups, sorted by alias.
    pub aliases: Vec<Alias>,
    /// A `routing_strategy` other than `simple-shuffle` (warned at start-up; shuffle is used).
    pub unsupported_strategy: Option<String>,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            num_retries: DEFAULT_NUM_RETRIES,
            allowed_fails: DEFAULT_ALLOWED_FAILS,
            cooldown: DEFAULT_COOLDOWN,
            fallbacks: HashMap::new(),
            context_window_fallbacks: HashMap::new(),
            content_policy_fallbacks: HashMap::new(),
            aliases: Vec::new(),
            unsupported_strategy: None,
        }
    }
}

impl RouterSettings {
    pub fn fallbacks_of(&self, group: &str) -> &[String] {
        lookup(&self.fallbacks, group)
    }

    pub fn context_window_fallbacks_of(&self, group: &str) -> &[String] {
        lookup(&self.context_window_fallbacks, group)
    }

    pub fn content_policy_fallbacks_of(&self, group: &str) -> &[String] {
        lookup(&self.content_policy_fallbacks, group)
    }
}

/// Another name for a group (`router_settings.model_group_alias`).
#[derive(Debug, Clone, PartialEq)]
pub struct Alias {
    pub alias: String,
    pub group: String,
    /// Left out of `/models`.
    pub hidden: bool,
}

fn lookup<'a>(map: &'a HashMap<String, Vec<String>>, group: &str) -> &'a [String] {
    map.get(group)
        .or_else(|| map.get("*"))
        .map_or(&[], Vec::as_slice)
}

/// Milliseconds since the first call: the clock cooldowns are kept in.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A deployment's recent failures, shared by every call.
#[derive(Debug, Default)]
pub struct Health {
    /// The minute `fails` counts in (`now_ms / 60_000`).
    minute: AtomicU64,
    fails: AtomicU32,
    cooled_until_ms: AtomicU64,
}

impl Health {
    fn cooled(&self, now: u64) -> bool {
        self.cooled_until_ms.load(Ordering::Relaxed) > now
    }

    /// Counts a failure; cools the deployment down after more than `allowed_fails` in a minute,
    /// or at once on a 429 (as LiteLLM does in a group of several).
    fn failed(&self, settings: &RouterSettings, rate_limited: bool) {
        let now = now_ms();
        let minute = now / 60_000;
        if self.minute.swap(minute, Ordering::Relaxed) != minute {
            self.fails.store(0, Ordering::Relaxed);
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if rate_limited || fails > settings.allowed_fails {
            self.cooled_until_ms.store(
                now + settings.cooldown.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
    }
}

/// The deployments behind one `model_name`, with their shuffle weights.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub routes: Vec<Arc<Route>>,
    /// Relative weights (`weight`, else `rpm`, else `tpm`); empty when all are equal.
    weights: Vec<f64>,
}

/// The most deployments a call tells apart when choosing where to retry (more are chosen from
/// without that memory).
const TRACKED: usize = 64;

impl Group {
    pub fn new(name: String, routes: Vec<Arc<Route>>) -> Self {
        let weights = shuffle_weights(&routes);
        Self {
            name,
            routes,
            weights,
        }
    }

    /// A deployment to try: `simple-shuffle` among those neither cooling down nor already tried
    /// by this call (`tried`, a bit per deployment); failing that, among those not cooling down;
    /// failing that, any. `random` is uniform in [0, 1).
    pub fn pick(&self, tried: u64, random: impl FnOnce() -> f64) -> usize {
        if self.routes.len() == 1 {
            return 0;
        }
        let now = now_ms();
        let fresh = |i: usize| i >= TRACKED || tried & (1 << i) == 0;
        let warm = |i: usize| !self.routes[i].health.cooled(now);
        let r = random();
        weighted(&self.weights, self.routes.len(), |i| fresh(i) && warm(i), r)
            .or_else(|| weighted(&self.weights, self.routes.len(), warm, r))
            .or_else(|| weighted(&self.weights, self.routes.len(), |_| true, r))
            .unwrap_or(0)
    }

    /// Records a failed attempt against deployment `i`. A group of one is never cooled down:
    /// there would be nothing left to call. Answers the request itself caused (a bad request,
    /// a prompt too long, refused content) say nothing about the deployment and are not counted
    /// (as in LiteLLM): otherwise any client could cool a deployment down for everyone.
    pub fn failed(&self, i: usize, settings: &RouterSettings, failure: Failure) {
        let rate_limited = match failure {
            _ if self.routes.len() < 2 => return,
            Failure::Retryable { rate_limited } => rate_limited,
            Failure::Other => false,
            Failure::ContextWindow | Failure::ContentPolicy | Failure::Client => return,
        };
        self.routes[i].health.failed(settings, rate_limited);
    }
}

/// `weight`, else `rpm`, else `tpm`, when any deployment of the group sets it (the others count
/// 0, as in LiteLLM's `simple_shuffle`); empty (uniform) otherwise.
fn shuffle_weights(routes: &[Arc<Route>]) -> Vec<f64> {
    let fields: [fn(&Route) -> Option<f64>; 3] = [
        |r| r.deployment.weight,
        |r| r.deployment.rpm.map(|v| v as f64),
        |r| r.deployment.tpm.map(|v| v as f64),
    ];
    for field in fields {
        if routes.iter().any(|r| field(r).is_some()) {
            let weights: Vec<f64> = routes
                .iter()
                .map(|r| field(r).unwrap_or(0.0).max(0.0))
                .collect();
            if weights.iter().sum::<f64>() > 0.0 {
                return weights;
            }
        }
    }
    Vec::new()
}

/// Index chosen with probability proportional to its weight among `eligible` ones (uniform when
/// `weights` is empty, or when every eligible weight is 0); `None` when none is eligible.
pub fn weighted(
    weights: &[f64],
    len: usize,
    eligible: impl Fn(usize) -> bool,
    random: f64,
) -> Option<usize> {
    let weight = |i: usize| weights.get(i).copied().unwrap_or(1.0);
    let candidates = (0..len).filter(|&i| eligible(i));
    let total: f64 = candidates.clone().map(weight).sum();
    if total <= 0.0 {
        let n = candidates.clone().count();
        if n == 0 {
            return None;
        }
        let k = ((random * n as f64) as usize).min(n - 1);
        return candidates.clone().nth(k);
    }
    let mut point = random * total;
    let mut last = None;
    for i in candidates {
        let w = weight(i);
        if w <= 0.0 {
            continue;
        }
        last = Some(i);
        if point < w {
            return Some(i);
        }
        point -= w;
    }
    last
}

/// How a failed attempt counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connection failure, timeout before the answer began, 408, 409, 429 or 5xx (LiteLLM's
    /// `should_retry`): another deployment is tried.
    Retryable { rate_limited: bool },
    /// The prompt does not fit the model's context: `context_window_fallbacks`, if any.
    ContextWindow,
    /// The upstream refused the content (Azure's `content_filter`): passed on as it is, unless
    /// `content_policy_fallbacks` name another group.
    ContentPolicy,
    /// Not worth retrying here (e.g. 401, 404), but another group may answer: `fallbacks`.
    Other,
    /// The request itself is at fault (400, 422, a content-filter refusal): answered as it is.
    Client,
}

/// Phrases upstreams use when a prompt exceeds the context window (OpenAI's error code, and the
/// wordings LiteLLM's exception mapping matches).
const CONTEXT_WINDOW_MARKERS: &[&str] = &[
    "context_length_exceeded",
    "maximum context length",
    "context window",
    "prompt is too long",
    "input is too long",
    "too many tokens",
];

/// How upstreams word a content refusal (Azure's error code, OpenAI's and LiteLLM's wordings).
const CONTENT_POLICY_MARKERS: &[&str] = &[
    "content_filter",
    "content_policy_violation",
    "content management policy",
];

pub fn classify(error: &ProxyError) -> Failure {
    match error {
        ProxyError::UpstreamUnreachable { .. } | ProxyError::UpstreamTimeout { .. } => {
            Failure::Retryable {
                rate_limited: false,
            }
        }
        ProxyError::Upstream { status, body, .. } => {
            let s = *status;
            if s == StatusCode::TOO_MANY_REQUESTS {
                Failure::Retryable { rate_limited: true }
            } else if s.is_server_error()
                || s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::CONFLICT
            {
                Failure::Retryable {
                    rate_limited: false,
                }
            } else if s == StatusCode::BAD_REQUEST || s == StatusCode::PAYLOAD_TOO_LARGE {
                let text = String::from_utf8_lossy(body).to_ascii_lowercase();
                if CONTEXT_WINDOW_MARKERS.iter().any(|m| text.contains(m)) {
                    Failure::ContextWindow
                } else if CONTENT_POLICY_MARKERS.iter().any(|m| text.contains(m)) {
                    Failure::ContentPolicy
                } else {
                    Failure::Client
                }
            } else if s == StatusCode::UNPROCESSABLE_ENTITY {
                Failure::Client
            } else {
                Failure::Other
            }
        }
        _ => Failure::Client,
    }
}

/// Where a requested model name leads: its group, and for a wildcard the part `*` matched.
pub struct Target<'a> {
    pub group: &'a Arc<Group>,
    pub matched: Option<&'a str>,
}

/// Every group by name, and the wildcard ones (`*`, `openai/*`) by prefix, longest first.
#[derive(Debug, Default)]
pub struct Groups {
    exact: HashMap<String, Arc<Group>>,
    wildcards: Vec<(String, Arc<Group>)>,
}

impl Groups {
    pub fn new(groups: Vec<Arc<Group>>, aliases: &[Alias]) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for g in groups {
            if let Some(prefix) = g.name.strip_suffix('*') {
                wildcards.push((prefix.to_owned(), g.clone()));
            }
            exact.insert(g.name.clone(), g);
        }
        for a in aliases {
            if let Some(g) = exact.get(&a.group).cloned() {
                exact.entry(a.alias.clone()).or_insert(g);
            }
        }
        wildcards.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self { exact, wildcards }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Group>> {
        self.exact.get(name)
    }

    /// The group serving `model`: by its exact name, else the longest wildcard prefix matching.
    pub fn resolve<'a>(&'a self, model: &'a str) -> Option<Target<'a>> {
        if let Some(group) = self.exact.get(model) {
            return Some(Target {
                group,
                matched: None,
            });
        }
        self.wildcards.iter().find_map(|(prefix, group)| {
            let rest = model.strip_prefix(prefix.as_str())?;
            (!rest.is_empty()).then_some(Target {
                group,
                matched: Some(rest),
            })
        })
    }
}

/// The model sent upstream: a wildcard deployment's `*` replaced by what the request's name
/// matched (`model_name: "*"`, `model: openai/*`: `gpt-4o` is sent as `gpt-4o`).
pub fn upstream_model<'a>(
    deployment_model: &'a str,
    matched: Option<&str>,
) -> std::borrow::Cow<'a, str> {
    match matched {
        Some(m) if deployment_model.contains('*') => deployment_model.replace('*', m).into(),
        _ => deployment_model.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a seeded, dependency-free source of uniform draws for the tests.
    fn draws(mut seed: u64) -> impl FnMut() -> f64 {
        move || {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn weights_9_to_1_split_1000_calls_9_to_1() {
        for seed in [1, 2, 3, 42] {
            let mut r = draws(seed);
            let mut counts = [0u32; 2];
            for _ in 0..1000 {
                counts[weighted(&[9.0, 1.0], 2, |_| true, r()).unwrap()] += 1;
            }
            // Binomial(1000, 0.9): sd ≈ 9.5; ±4 sd.
            assert!((862..=938).contains(&counts[0]), "seed {seed}: {counts:?}");
        }
    }

    #[test]
    fn uniform_without_weights_and_only_among_eligible() {
        let mut r = draws(7);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[weighted(&[], 3, |_| true, r()).unwrap()] += 1;
        }
        for c in counts {
            assert!((900..=1100).contains(&c), "{counts:?}");
        }
        for _ in 0..100 {
            assert_eq!(weighted(&[9.0, 1.0, 5.0], 3, |i| i == 1, r()), Some(1));
        }
        assert_eq!(weighted(&[1.0, 1.0], 2, |_| false, 0.5), None);
        // Eligible ones all weigh 0: chosen uniformly rather than not at all.
        assert_eq!(weighted(&[1.0, 0.0], 2, |i| i == 1, 0.9), Some(1));
    }

    #[test]
    fn classifies_upstream_answers_as_litellm_retries_them() {
        let up = |status: u16, body: &'static str| ProxyError::Upstream {
            status: StatusCode::from_u16(status).unwrap(),
            content_type: None,
            body: body.into(),
        };
        assert_eq!(
            classify(&up(429, "")),
            Failure::Retryable { rate_limited: true }
        );
        assert_eq!(
            classify(&up(503, "")),
            Failure::Retryable {
                rate_limited: false
            }
        );
        assert_eq!(
            classify(&up(400, r#"{"error":{"code":"context_length_exceeded"}}"#)),
            Failure::ContextWindow
        );
        assert_eq!(
            classify(&up(400, r#"{"error":{"code":"content_filter"}}"#)),
            Failure::ContentPolicy
        );
        assert_eq!(classify(&up(401, "")), Failure::Other);
        let down = ProxyError::UpstreamUnreachable {
            model: "m".into(),
            reason: "refused".into(),
        };
        assert_eq!(
            classify(&down),
            Failure::Retryable {
                rate_limited: false
            }
        );
    }

    #[test]
    fn wildcards_substitute_the_matched_name() {
        assert_eq!(upstream_model("*", Some("gpt-4o")), "gpt-4o");
        assert_eq!(upstream_model("gpt-4o", Some("x")), "gpt-4o");
        assert_eq!(upstream_model("*", None), "*");
    }

    fn group_of(n: usize) -> Group {
        let prices = crate::proxy::pricing::PriceTable::default();
        let routes = (0..n)
            .map(|i| {
                Arc::new(crate::proxy::Route::new(
                    &crate::proxy::Deployment {
                        model_name: "g".into(),
                        upstream_model: format!("m{i}"),
                        api_base: "http://127.0.0.1:9/v1".into(),
                        ..crate::proxy::Deployment::default()
                    },
                    &prices,
                ))
            })
            .collect();
        Group::new("g".into(), routes)
    }

    #[test]
    fn only_the_deployments_own_failures_cool_it_down() {
        let settings = RouterSettings {
            allowed_fails: 0,
            cooldown: Duration::from_secs(60),
            ..RouterSettings::default()
        };
        let g = group_of(2);
        for client_fault in [
            Failure::Client,
            Failure::ContextWindow,
            Failure::ContentPolicy,
        ] {
            g.failed(0, &settings, client_fault);
        }
        assert!(!g.routes[0].health.cooled(now_ms()), "the client's fault");
        assert_eq!(g.pick(0, || 0.1), 0, "a draw that lands on it picks it");
        g.failed(
            0,
            &settings,
            Failure::Retryable {
                rate_limited: false,
            },
        );
        assert!(g.routes[0].health.cooled(now_ms()));
        assert_eq!(
            g.pick(0, || 0.1),
            1,
            "cooling down: skipped whatever the draw"
        );
        assert_eq!(
            g.pick(0b10, || 0.9),
            1,
            "tried already, but not cooling down"
        );
        g.failed(1, &settings, Failure::Other);
        assert_eq!(
            g.pick(0, || 0.1),
            0,
            "every one cooling down: any, by the draw"
        );
        assert_eq!(g.pick(0, || 0.9), 1);
        // A group of one is never cooled down.
        let lone = group_of(1);
        lone.failed(0, &settings, Failure::Retryable { rate_limited: true });
        assert!(!lone.routes[0].health.cooled(now_ms()));
    }

    #[test]
    fn health_cools_down_after_allowed_fails() {
        let settings = RouterSettings {
            allowed_fails: 2,
            cooldown: Duration::from_secs(60),
            ..RouterSettings::default()
        };
        let h = Health::default();
        h.failed(&settings, false);
        h.failed(&settings, false);
        assert!(!h.cooled(now_ms()));
        h.failed(&settings, false);
        assert!(h.cooled(now_ms()));
        let h = Health::default();
        h.failed(&settings, true);
        assert!(h.cooled(now_ms()), "a 429 cools down at once");
    }
}
