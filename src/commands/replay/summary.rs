//! What a replay did (or, with `--dry-run`, would do): counts, the first rejections, and per
//! customer the events, tokens and cost that are (or would be) billed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::commands::output::{self, printable, usd};
use crate::ship::event::EventBody;

/// How many rejections the summary shows in full; the rest are only counted.
pub const FIRST_REJECTIONS: usize = 5;

/// Totals for one customer (the `external_subscription_id` its events carry).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CustomerTotals {
    pub customer: String,
    pub events: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
}

impl CustomerTotals {
    /// The per-customer table that `tally replay` and `tally demo` both print.
    pub fn table(customers: &[CustomerTotals]) -> comfy_table::Table {
        let mut t = output::table(
            &[
                "customer",
                "events",
                "input tokens",
                "output tokens",
                "cost",
            ],
            &[1, 2, 3, 4],
        );
        for c in customers {
            t.add_row(vec![
                // A customer id is whatever a client sent as `user`.
                printable(&c.customer),
                c.events.to_string(),
                c.input_tokens.to_string(),
                c.output_tokens.to_string(),
                usd(c.cost_usd),
            ]);
        }
        t
    }
}

/// Per-customer totals over `(customer, record)` pairs, ordered by customer.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    by_customer: BTreeMap<String, CustomerTotals>,
}

/// What one new event adds to its customer's totals.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
}

impl From<&EventBody> for Usage {
    fn from(event: &EventBody) -> Self {
        Usage {
            input_tokens: event.input_tokens,
            output_tokens: event.output_tokens,
            total_tokens: event.total_tokens,
            cost_usd: event.response_cost.unwrap_or(0.0),
        }
    }
}

impl Totals {
    pub fn add(&mut self, customer: &str, usage: Usage) {
        // Looked up before an owned key is made: most events are of a customer seen already.
        let t = match self.by_customer.get_mut(customer) {
            Some(t) => t,
            None => self
                .by_customer
                .entry(customer.to_owned())
                .or_insert_with(|| CustomerTotals {
                    customer: customer.to_owned(),
                    ..CustomerTotals::default()
                }),
        };
        t.events += 1;
        t.input_tokens = t.input_tokens.saturating_add(usage.input_tokens);
        t.output_tokens = t.output_tokens.saturating_add(usage.output_tokens);
        t.total_tokens = t.total_tokens.saturating_add(usage.total_tokens);
        t.cost_usd += usage.cost_usd;
    }

    pub fn into_vec(self) -> Vec<CustomerTotals> {
        self.by_customer.into_values().collect()
    }
}

/// A line that was refused, with where it was and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    pub path: String,
    pub offset: u64,
    pub reason: String,
}

/// The counts every replay reports. Field names are part of the JSON interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplaySummary {
    pub dry_run: bool,
    pub files: Vec<String>,
    pub lines_read: u64,
    /// Billable records not seen before: enqueued (or, in a dry run, that would be).
    pub new_events: u64,
    /// Records whose `transaction_id` the outbox already holds (billed or queued), or that
    /// appeared earlier in this replay: never billed again.
    pub already_billed: u64,
    /// Lines that are not valid records (see `first_rejections`).
    pub rejected: u64,
    /// New billable records with no customer id for the charge-by setting: kept as held.
    pub held: u64,
    /// Records whose status is not `success` (never billed).
    pub not_billable: u64,
    /// Records outside `--since` / `--until`.
    pub outside_window: u64,
    /// Empty (or whitespace-only) lines: nothing to bill, counted and not stored.
    pub blank_lines: u64,
    pub first_rejections: Vec<Rejection>,
    pub customers: Vec<CustomerTotals>,
}

impl ReplaySummary {
    pub fn reject(&mut self, path: &Path, offset: u64, reason: String) {
        self.rejected += 1;
        if self.first_rejections.len() < FIRST_REJECTIONS {
            self.first_rejections.push(Rejection {
                path: path.display().to_string(),
                offset,
                reason,
            });
        }
    }

    /// The summary for people.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let verb = if self.dry_run {
            "would be billed (dry run: nothing written)"
        } else {
            "queued for Lago"
        };
        if self.customers.is_empty() {
            let _ = writeln!(s, "Nothing new {verb}.");
        } else {
            let _ = writeln!(s, "New events {verb}, per customer:");
            let _ = writeln!(s, "{}", CustomerTotals::table(&self.customers));
        }
        let _ = writeln!(
            s,
            "{} lines read from {} file(s): {} new, {} already billed, {} held (no customer id), \
             {} rejected, {} not billable (status), {} outside the time window, {} blank.",
            self.lines_read,
            self.files.len(),
            self.new_events,
            self.already_billed,
            self.held,
            self.rejected,
            self.not_billable,
            self.outside_window,
            self.blank_lines
        );
        if self.held > 0 {
            let _ = writeln!(
                s,
                "Held events wait for a customer id: fix LAGO_API_CHARGE_BY, then `tally queue retry --state held`."
            );
        }
        if !self.first_rejections.is_empty() {
            let _ = writeln!(s, "First rejected lines:");
            for r in &self.first_rejections {
                let _ = writeln!(
                    s,
                    "  {}:{}: {}",
                    printable(&r.path),
                    r.offset,
                    printable(&r.reason)
                );
            }
            if self.rejected > self.first_rejections.len() as u64 {
                let _ = writeln!(
                    s,
                    "  … and {} more",
                    self.rejected - self.first_rejections.len() as u64
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(input: u64, output: u64, cost: Option<f64>) -> EventBody {
        let line = serde_json::json!({
            "schema": 1, "transaction_id": "t", "end_time": "2026-11-01T00:00:00.000Z",
            "model": "gpt-4o", "input_tokens": input, "output_tokens": output,
            "response_cost": cost, "status": "success"
        })
        .to_string();
        let record = crate::spend::SpendRecord::parse_line(line.as_bytes()).unwrap();
        EventBody::of(&record, None)
    }

    #[test]
    fn totals_add_up_per_customer_in_order() {
        let mut t = Totals::default();
        t.add("team-b", (&record(1, 2, Some(0.5))).into());
        t.add("team-a", (&record(10, 20, Some(0.25))).into());
        t.add("team-a", (&record(5, 5, None)).into());
        let v = t.into_vec();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].customer, "team-a");
        assert_eq!(
            (
                v[0].events,
                v[0].input_tokens,
                v[0].output_tokens,
                v[0].total_tokens
            ),
            (2, 15, 25, 40)
        );
        assert!((v[0].cost_usd - 0.25).abs() < 1e-12);
        assert_eq!(v[1].events, 1);
    }

    #[test]
    fn keeps_only_the_first_rejections_but_counts_all() {
        let mut s = ReplaySummary::default();
        for i in 0..8 {
            s.reject(Path::new("x.jsonl"), i * 10, format!("bad {i}"));
        }
        assert_eq!(s.rejected, 8);
        assert_eq!(s.first_rejections.len(), FIRST_REJECTIONS);
        let text = s.to_text();
        assert!(text.contains("x.jsonl:0: bad 0"), "{text}");
        assert!(text.contains("and 3 more"), "{text}");
    }

    #[test]
    fn json_field_names_are_stable() {
        let v = serde_json::to_value(ReplaySummary::default()).unwrap();
        for key in [
            "dry_run",
            "files",
            "lines_read",
            "new_events",
            "already_billed",
            "rejected",
            "held",
            "not_billable",
            "outside_window",
            "blank_lines",
            "first_rejections",
            "customers",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }
}
