//! `tally audit`: does Lago really have what it acked, in a form it can bill? (docs/operations.md,
//! "tally audit")
//!
//! Each acked event in scope is looked up with `GET /api/v1/events/{transaction_id}`: it must be
//! there with the code, external_subscription_id and timestamp tally sent (kept at the ack since
//! outbox schema v5). Each distinct external_subscription_id is looked up once with
//! `GET /api/v1/subscriptions/{external_id}`: events of one Lago does not know are stored and
//! never billed. The work list and each result are in the outbox (`audit_items`), so an
//! interrupted audit resumes where it stopped. `--fix` puts missing events back to pending,
//! rebuilt from their spend-log line, for the shipper to send again; it never touches events
//! Lago has.
//!
//! - [`crate::ship::lago_read`]: the paced, 429-aware reads from Lago (shared with the shipper's
//!   subscription checks).
//! - [`rebuild`]: a missing event's Lago bytes, from the spend-log line it came from.

pub mod rebuild;

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cli::{AuditArgs, OutputFormat};
use crate::commands::output::{self, EXIT_NEEDS_ATTENTION, printable};
use crate::commands::replay::window::TimeWindow;
use crate::ship::lago_read::{LagoReader, Lookup};
use crate::ship::outbox::{AuditItem, AuditScope, Outbox};

/// Events checked per outbox commit of results.
const PAGE: usize = 50;

/// One event Lago has in another form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub transaction_id: String,
    pub detail: String,
}

/// What `tally audit` prints (`--output-format json`: these field names are stable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// Acked events looked up in Lago (in this run and the interrupted runs it resumed).
    pub checked: u64,
    /// How many of them Lago does not have.
    pub missing: u64,
    /// How many Lago has with another code, subscription or timestamp.
    pub different: u64,
    /// external_subscription_id → events, for subscriptions Lago does not know (never billed).
    pub unknown_subscriptions: BTreeMap<String, u64>,
    pub missing_ids: Vec<String>,
    pub different_events: Vec<Difference>,
    /// With `--fix`: missing events put back to pending (the shipper sends them again).
    pub requeued: Vec<String>,
    /// With `--fix`: missing events that could not be rebuilt, and why.
    pub not_fixable: Vec<Difference>,
    /// Whether this run continued an interrupted audit.
    pub resumed: bool,
    /// 429 answers waited out.
    pub rate_limited: u64,
}

impl AuditReport {
    pub fn needs_attention(&self) -> bool {
        self.missing > 0 || self.different > 0 || !self.unknown_subscriptions.is_empty()
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Checked {} acked events against Lago{}: {} missing, {} different, {} unknown subscriptions.",
            self.checked,
            if self.resumed { " (resumed)" } else { "" },
            self.missing,
            self.different,
            self.unknown_subscriptions.len()
        );
        for id in self.missing_ids.iter().take(50) {
            let _ = writeln!(s, "  missing: {}", printable(id));
        }
        for d in self.different_events.iter().take(50) {
            let _ = writeln!(
                s,
                "  different: {}: {}",
                printable(&d.transaction_id),
                printable(&d.detail)
            );
        }
        for (id, n) in &self.unknown_subscriptions {
            let _ = writeln!(
                s,
                "  unknown subscription {}: {n} events stored by Lago, never billed; create the subscription in Lago",
                printable(id)
            );
        }
        if !self.requeued.is_empty() {
            let _ = writeln!(
                s,
                "Requeued {} missing events: `tally ship` sends them again.",
                self.requeued.len()
            );
        }
        for d in &self.not_fixable {
            let _ = writeln!(
                s,
                "  not fixable: {}: {}",
                printable(&d.transaction_id),
                printable(&d.detail)
            );
        }
        if self.missing > 0 && self.requeued.is_empty() && self.not_fixable.is_empty() {
            s.push_str("Run `tally audit --fix` to send the missing events again.\n");
        }
        if !self.needs_attention() {
            s.push_str("All is well: Lago has every checked event as sent.\n");
        }
        s
    }
}

pub async fn run(args: AuditArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let window = TimeWindow::parse(args.since.as_deref(), args.until.as_deref())?;
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 1000.0) {
        anyhow::bail!(
            "--rate {} is not a request rate; give requests per second above 0 and at most 1000 (default 10)",
            args.rate
        );
    }
    let base = args.lago.lago_api_base.as_deref().context(
        "LAGO_API_BASE is not set; set it to the Lago API's base URL, e.g. https://api.getlago.com",
    )?;
    let base = reqwest::Url::parse(base.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .with_context(|| {
            format!(
                "LAGO_API_BASE {:?} is not an http(s) URL",
                crate::ship::settings::redact_url_text(base.trim())
            )
        })?;
    let key = args
        .lago
        .lago_api_key
        .clone()
        .filter(|k| !k.trim().is_empty())
        .context("LAGO_API_KEY is not set; the audit reads events from Lago with it")?;
    let state_dir = args.shared.state_dir.clone();
    if !state_dir.join(crate::ship::outbox::DB_FILE).is_file() {
        anyhow::bail!(
            "no outbox at {}: `tally ship` has not run with this state directory; check TALLY_STATE_DIR",
            state_dir.join(crate::ship::outbox::DB_FILE).display()
        );
    }
    let scope = AuditScope {
        since_ms: window.since.map(|t| t.timestamp_millis()),
        until_ms: window.until.map(|t| t.timestamp_millis()),
        sample: args.sample,
    };
    let outbox = Outbox::open_in(&state_dir)
        .context("cannot open the outbox")?
        .shared();
    let mut reader = LagoReader::new(&base, key.trim(), args.rate)?;
    let fix = if args.fix {
        Some(Fix {
            precise_amount: crate::commands::settings::precise_amount(&args.lago)?,
        })
    } else {
        None
    };
    let report = audit(&outbox, &mut reader, &scope, fix, &shutdown).await?;
    let Some(mut report) = report else {
        eprintln!(
            "tally: audit interrupted; run `tally audit` again with the same options to resume"
        );
        return Ok(ExitCode::from(EXIT_NEEDS_ATTENTION));
    };
    report.rate_limited = reader.rate_limited;
    match args.output_format {
        OutputFormat::Json => output::print_json(&report)?,
        OutputFormat::Text => output::print_text(&report.to_text())?,
    }
    Ok(if report.needs_attention() {
        ExitCode::from(EXIT_NEEDS_ATTENTION)
    } else {
        ExitCode::SUCCESS
    })
}

async fn blocking<T: Send + 'static>(
    outbox: &crate::ship::outbox::SharedOutbox,
    f: impl FnOnce(&mut Outbox) -> Result<T, crate::ship::outbox::OutboxError> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(crate::ship::outbox::with_outbox(outbox, f).await?)
}

/// `--fix`: missing events are rebuilt as `tally ship` would send them, so with
/// `TALLY_PRECISE_AMOUNT` they carry their amount again.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fix {
    pub precise_amount: Option<crate::ship::amount::Markup>,
}

/// Runs (or resumes) the audit; `None` when `shutdown` interrupted it.
pub async fn audit(
    outbox: &crate::ship::outbox::SharedOutbox,
    reader: &mut LagoReader,
    scope: &AuditScope,
    fix: Option<Fix>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<AuditReport>> {
    let mut report = AuditReport::default();
    let unfinished = blocking(outbox, |ob| ob.unfinished_audit()).await?;
    if unfinished.as_ref() == Some(scope) {
        report.resumed = true;
    } else {
        let scope = scope.clone();
        blocking(outbox, move |ob| ob.start_audit(&scope)).await?;
    }
    let progress = blocking(outbox, |ob| ob.audit_progress()).await?;
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(progress.total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "auditing {bar:30} {pos}/{len} events, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(progress.done);
    loop {
        let items = blocking(outbox, |ob| ob.audit_next(PAGE)).await?;
        if items.is_empty() {
            break;
        }
        let mut results: Vec<(i64, &'static str, Option<String>)> = Vec::with_capacity(items.len());
        for item in &items {
            if shutdown.is_cancelled() {
                break;
            }
            let lookup = tokio::select! {
                r = reader.event(&item.transaction_id) => r,
                () = shutdown.cancelled() => break,
            };
            let outcome = match lookup? {
                Lookup::NotFound => ("missing", None),
                Lookup::Found(event) => match compare(item, &event) {
                    None => ("ok", None),
                    Some(d) => ("different", Some(d)),
                },
            };
            results.push((item.seq, outcome.0, outcome.1));
            bar.inc(1);
        }
        let done = results.len();
        blocking(outbox, move |ob| {
            let refs: Vec<(i64, &str, Option<&str>)> = results
                .iter()
                .map(|(s, r, d)| (*s, *r, d.as_deref()))
                .collect();
            ob.audit_record(&refs)
        })
        .await?;
        if done < items.len() {
            bar.abandon();
            return Ok(None);
        }
    }
    bar.finish_and_clear();

    // Each subscription once.
    let subscriptions = blocking(outbox, |ob| ob.audit_subscriptions()).await?;
    for (id, events) in subscriptions {
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        let known = matches!(reader.subscription(&id).await?, Lookup::Found(_));
        if !known {
            report.unknown_subscriptions.insert(id.clone(), events);
        }
        blocking(outbox, move |ob| ob.set_subscription_known(&id, known)).await?;
    }

    let progress = blocking(outbox, |ob| ob.audit_progress()).await?;
    report.checked = progress.done;
    for (id, result, detail) in blocking(outbox, |ob| ob.audit_findings()).await? {
        match result.as_str() {
            "missing" => report.missing_ids.push(id),
            _ => report.different_events.push(Difference {
                transaction_id: id,
                detail: detail.unwrap_or_default(),
            }),
        }
    }
    report.missing = report.missing_ids.len() as u64;
    report.different = report.different_events.len() as u64;

    if let Some(fix) = fix.filter(|_| !report.missing_ids.is_empty()) {
        let ids = report.missing_ids.clone();
        let (requeued, not_fixable) = blocking(outbox, move |ob| {
            let mut rebuilt = Vec::new();
            let mut not_fixable = Vec::new();
            for id in &ids {
                match rebuild::missing_event(ob, id, fix.precise_amount)? {
                    Ok(event) => rebuilt.push(event),
                    Err(why) => not_fixable.push(Difference {
                        transaction_id: id.clone(),
                        detail: why,
                    }),
                }
            }
            Ok((ob.requeue_acked(&rebuilt)?, not_fixable))
        })
        .await?;
        report.requeued = requeued;
        report.not_fixable = not_fixable;
    }
    blocking(outbox, |ob| ob.finish_audit()).await?;
    Ok(Some(report))
}

/// How Lago's copy differs from what was sent, or `None` when it matches. Fields tally did not
/// keep (events acked before outbox schema v5) are not compared.
fn compare(item: &AuditItem, lago: &Value) -> Option<String> {
    let text = |k: &str| lago.get(k).and_then(Value::as_str);
    let mut diffs = Vec::new();
    if let Some(code) = &item.code
        && text("code") != Some(code.as_str())
    {
        diffs.push(format!(
            "code: sent {code:?}, Lago has {:?}",
            text("code").unwrap_or("")
        ));
    }
    if let Some(sub) = &item.subscription_id
        && text("external_subscription_id") != Some(sub.as_str())
    {
        diffs.push(format!(
            "external_subscription_id: sent {sub:?}, Lago has {:?}",
            text("external_subscription_id").unwrap_or("")
        ));
    }
    if let Some(sent) = item.timestamp.as_deref().and_then(seconds_to_millis) {
        let theirs = text("timestamp")
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        if theirs != Some(sent) {
            diffs.push(format!(
                "timestamp: sent {}, Lago has {:?}",
                chrono::DateTime::from_timestamp_millis(sent)
                    .map_or_else(|| sent.to_string(), |t| crate::spend::fmt_millis(&t)),
                text("timestamp").unwrap_or("")
            ));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

/// `"1795773600.250"` (Lago seconds, as sent) → milliseconds.
fn seconds_to_millis(s: &str) -> Option<i64> {
    let s = s.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = whole.parse().ok()?;
    let mut ms = 0i64;
    for (i, c) in frac.chars().take(3).enumerate() {
        ms += i64::from(c.to_digit(10)?) * 10i64.pow(2 - i as u32);
    }
    let total = secs.checked_mul(1000)?.checked_add(ms)?;
    Some(if negative { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item() -> AuditItem {
        AuditItem {
            seq: 1,
            transaction_id: "tx".into(),
            subscription_id: Some("cust".into()),
            code: Some("llm_usage".into()),
            timestamp: Some("1795773600.250".into()),
        }
    }

    #[test]
    fn lago_seconds_parse_to_millis() {
        assert_eq!(seconds_to_millis("1795773600.250"), Some(1_795_773_600_250));
        assert_eq!(seconds_to_millis("5"), Some(5_000));
        assert_eq!(seconds_to_millis("-1.5"), Some(-1_500));
        assert_eq!(seconds_to_millis("x"), None);
    }

    #[test]
    fn compare_names_each_difference() {
        let same = json!({"code": "llm_usage", "external_subscription_id": "cust",
                          "timestamp": "2026-11-27T10:00:00.250Z"});
        assert_eq!(compare(&item(), &same), None);
        let other = json!({"code": "other", "external_subscription_id": "cust2",
                           "timestamp": "2026-11-27T10:00:00.000Z"});
        let d = compare(&item(), &other).unwrap();
        assert!(
            d.contains("code: sent \"llm_usage\"")
                && d.contains("cust2")
                && d.contains("timestamp"),
            "{d}"
        );
        // Rows acked before schema v5 kept no code or timestamp: only the subscription is compared.
        let old = AuditItem {
            code: None,
            timestamp: None,
            ..item()
        };
        assert_eq!(compare(&old, &other).unwrap().matches(';').count(), 0);
    }
}
