//! From a spend record to what the outbox stores: who is charged (`LAGO_API_CHARGE_BY`) and the
//! exact bytes of the Lago event.
//!
//! The event is built once, at ingest, and stored: every resend sends the same bytes, with the
//! same `transaction_id` and the same explicit `timestamp`, which is what lets both Lago stores
//! (Postgres: 422 `value_already_exist`; ClickHouse: later dedupe on id + timestamp) absorb a
//! resend. Building is deterministic anyway (fixed field order, serde_json's shortest float
//! form), so a re-resolve by `tally queue retry` yields the same bytes for the same inputs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ship::amount::{Markup, precise_total_amount_cents};
use crate::spend::{SpendRecord, Status};

/// One id field of the spend record that can name the Lago customer's subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdField {
    EndUserId,
    UserId,
    TeamId,
}

impl IdField {
    pub fn name(self) -> &'static str {
        match self {
            IdField::EndUserId => "end_user_id",
            IdField::UserId => "user_id",
            IdField::TeamId => "team_id",
        }
    }
}

/// `LAGO_API_CHARGE_BY`: the id fields to try, in order; the first non-empty one wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeBy(Vec<IdField>);

impl Default for ChargeBy {
    /// `end_user_id`, as in LiteLLM.
    fn default() -> Self {
        Self(vec![IdField::EndUserId])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeByError {
    #[error(
        "unknown id field {0:?}; accepted: end_user_id, user_id, team_id, or a comma-separated fallback list such as team_id,user_id"
    )]
    Unknown(String),
    #[error(
        "no id field given; accepted: end_user_id, user_id, team_id, or a comma-separated fallback list such as team_id,user_id"
    )]
    Empty,
    #[error("{0} is listed twice; accepted: end_user_id, user_id, team_id, each at most once")]
    Repeated(&'static str),
}

impl FromStr for ChargeBy {
    type Err = ChargeByError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut fields = Vec::new();
        for part in s.split(',').map(str::trim) {
            let field = match part {
                "end_user_id" => IdField::EndUserId,
                "user_id" => IdField::UserId,
                "team_id" => IdField::TeamId,
                "" if s.trim().is_empty() => return Err(ChargeByError::Empty),
                other => return Err(ChargeByError::Unknown(other.to_owned())),
            };
            if fields.contains(&field) {
                return Err(ChargeByError::Repeated(field.name()));
            }
            fields.push(field);
        }
        Ok(Self(fields))
    }
}

impl fmt::Display for ChargeBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.0.iter().map(|f| f.name()).collect();
        f.write_str(&names.join(","))
    }
}

impl ChargeBy {
    pub fn fields(&self) -> &[IdField] {
        &self.0
    }

    /// The id that names the subscription, or why there is none.
    pub fn resolve<'r>(&self, record: &'r SpendRecord) -> Result<&'r str, String> {
        self.resolve_ids(
            record.end_user_id.as_deref(),
            record.user_id.as_deref(),
            record.team_id.as_deref(),
        )
    }

    /// Same, from the ids alone (what the outbox keeps of a pending or dead event).
    pub fn resolve_ids<'r>(
        &self,
        end_user_id: Option<&'r str>,
        user_id: Option<&'r str>,
        team_id: Option<&'r str>,
    ) -> Result<&'r str, String> {
        for field in &self.0 {
            let id = match field {
                IdField::EndUserId => end_user_id,
                IdField::UserId => user_id,
                IdField::TeamId => team_id,
            };
            if let Some(id) = id.filter(|id| !id.trim().is_empty()) {
                return Ok(id);
            }
        }
        let names: Vec<_> = self.0.iter().map(|f| f.name()).collect();
        Err(format!(
            "no {} on this record; LAGO_API_CHARGE_BY={self}",
            names.join(" or ")
        ))
    }
}

/// The customer ids of a record, kept with a pending or dead event so that `tally queue retry`
/// can re-resolve it with another charge-by without the full record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerIds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
}

impl CustomerIds {
    pub fn of(record: &SpendRecord) -> Self {
        Self {
            end_user_id: record.end_user_id.clone(),
            user_id: record.user_id.clone(),
            team_id: record.team_id.clone(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What the outbox needs to build events: the metric code, who is charged, and whether (with
/// which markup) events carry `precise_total_amount_cents` (`TALLY_PRECISE_AMOUNT`).
#[derive(Debug, Clone)]
pub struct EventSpec {
    pub code: String,
    pub charge_by: ChargeBy,
    pub precise_amount: Option<Markup>,
}

/// What becomes of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Billable, with a customer: send this event (JSON bytes, built once). Its `code` and
    /// timestamp (`time_ms`) are also kept apart in the outbox, for `tally audit`.
    Pending {
        external_subscription_id: String,
        event: Vec<u8>,
        code: String,
        time_ms: i64,
    },
    /// Billable, but no id for the charge-by setting: kept, not sent, until retried.
    Held { reason: String },
    /// Not billed (`status` other than `success`); remembered so a re-read is recognised.
    NotBillable { status: Status },
}

/// A parsed record, ready for [`crate::ship::outbox::Outbox::ingest`].
///
/// Only what delivery and the operator commands need is kept: the event bytes and the customer
/// ids for a pending record (the event holds everything else), the whole record only while it is
/// held (its event cannot be built yet). That keeps the outbox small and the ingest fast.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedRecord {
    pub transaction_id: String,
    /// Fingerprint of the line: a re-read with the same content is harmless, a different
    /// content under the same transaction_id is a conflict.
    pub content_hash: i64,
    pub customer_ids: CustomerIds,
    /// The canonical record JSON, kept for held records only.
    pub record_json: Option<Vec<u8>>,
    pub disposition: Disposition,
    /// Billable but without a `response_cost`: its event carries no precise amount (counted by
    /// the reader, `tally_ship_unpriced_records`).
    pub unpriced: bool,
}

/// Prepares a record read from a spend-log `line` (without its newline); the hash is of the
/// line's bytes, so reading the same line again is recognised without re-serializing anything.
pub fn prepare_line(record: &SpendRecord, line: &[u8], spec: &EventSpec) -> PreparedRecord {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    build(record, content_hash(line), spec)
}

/// Prepares a record that did not come from a tally spend-log line (e.g. converted from another
/// format); the hash is of its canonical serialization.
pub fn prepare(record: &SpendRecord, spec: &EventSpec) -> PreparedRecord {
    let line = record.to_line();
    build(record, content_hash(&line[..line.len() - 1]), spec)
}

fn build(record: &SpendRecord, content_hash: i64, spec: &EventSpec) -> PreparedRecord {
    let disposition = disposition(record, spec);
    let record_json = matches!(disposition, Disposition::Held { .. })
        .then(|| serde_json::to_vec(record).unwrap_or_default());
    PreparedRecord {
        transaction_id: record.transaction_id.clone(),
        content_hash,
        customer_ids: CustomerIds::of(record),
        record_json,
        disposition,
        unpriced: record.is_billable() && record.response_cost.is_none(),
    }
}

/// The disposition alone (used again by `retry` with a new charge-by).
pub fn disposition(record: &SpendRecord, spec: &EventSpec) -> Disposition {
    if !record.is_billable() {
        return Disposition::NotBillable {
            status: record.status.clone(),
        };
    }
    match spec.charge_by.resolve(record) {
        Ok(id) => Disposition::Pending {
            external_subscription_id: id.to_owned(),
            event: event_bytes_with(record, &spec.code, id, spec.precise_amount),
            code: spec.code.clone(),
            time_ms: record.end_time.timestamp_millis(),
        },
        Err(reason) => Disposition::Held { reason },
    }
}

/// Re-resolves a stored event (pending or dead) with `spec`: same transaction id, timestamp and
/// properties; customer and code as `spec` says now.
pub fn re_resolve_event(event: &[u8], ids: &CustomerIds, spec: &EventSpec) -> Option<Disposition> {
    let stored: StoredEvent = serde_json::from_slice(event).ok()?;
    Some(
        match spec.charge_by.resolve_ids(
            ids.end_user_id.as_deref(),
            ids.user_id.as_deref(),
            ids.team_id.as_deref(),
        ) {
            Ok(id) => {
                let time_ms = parse_lago_timestamp(&stored.timestamp)?;
                let event = LagoEvent {
                    transaction_id: &stored.transaction_id,
                    external_subscription_id: id,
                    code: &spec.code,
                    timestamp: stored.timestamp.clone(),
                    precise_total_amount_cents: stored.precise_total_amount_cents.clone(),
                    properties: stored.properties.borrowed(),
                };
                Disposition::Pending {
                    external_subscription_id: id.to_owned(),
                    event: event.to_json(),
                    code: spec.code.clone(),
                    time_ms,
                }
            }
            Err(reason) => Disposition::Held { reason },
        },
    )
}

/// A 64-bit hash of the line, as SQLite's integer type: eight bytes per step (FxHash-style
/// rotate-xor-multiply), stable across builds and platforms, and cheap at 150,000 lines/s. Its
/// only job is telling a harmless re-read from a conflicting duplicate; a collision would at worst
/// file a conflicting line as "already seen" — it is not billed either way.
pub fn content_hash(bytes: &[u8]) -> i64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    // Final avalanche so nearby inputs spread over all bits.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h as i64
}

#[derive(Deserialize)]
struct StoredEvent {
    transaction_id: String,
    timestamp: String,
    #[serde(default)]
    precise_total_amount_cents: Option<String>,
    properties: OwnedProperties,
}

#[derive(Deserialize)]
struct OwnedProperties {
    model: String,
    #[serde(default)]
    response_cost: Option<f64>,
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Absent from events stored before the token classes were sent: re-resolved without them.
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl OwnedProperties {
    fn borrowed(&self) -> Properties<'_> {
        Properties {
            model: &self.model,
            response_cost: self.response_cost,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            total_tokens: self.total_tokens,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens,
            cache_creation_input_tokens: self.cache_creation_input_tokens,
            reasoning_tokens: self.reasoning_tokens,
        }
    }
}

/// A Lago event, written by [`LagoEvent::to_json`] (serde's derive would give the same bytes,
/// which a test checks, at about twice the cost: every key goes through its escaper).
#[cfg_attr(test, derive(Serialize))]
struct LagoEvent<'a> {
    transaction_id: &'a str,
    external_subscription_id: &'a str,
    code: &'a str,
    timestamp: String,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    precise_total_amount_cents: Option<String>,
    properties: Properties<'a>,
}

#[cfg_attr(test, derive(Serialize))]
struct Properties<'a> {
    model: &'a str,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    response_cost: Option<f64>,
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    cache_read_input_tokens: Option<u64>,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    cache_creation_input_tokens: Option<u64>,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    reasoning_tokens: Option<u64>,
}

/// The Lago event for a record, as JSON bytes (docs/architecture.md, "From record to Lago event").
pub fn event_bytes(record: &SpendRecord, code: &str, external_subscription_id: &str) -> Vec<u8> {
    event_bytes_with(record, code, external_subscription_id, None)
}

/// Same, with `precise_total_amount_cents` (cost × 100 × markup) when `precise_amount` is set
/// and the record is priced; an unpriced record's event carries no amount.
pub fn event_bytes_with(
    record: &SpendRecord,
    code: &str,
    external_subscription_id: &str,
    precise_amount: Option<Markup>,
) -> Vec<u8> {
    let event = LagoEvent {
        transaction_id: &record.transaction_id,
        external_subscription_id,
        code,
        timestamp: lago_timestamp(record.end_time.timestamp_millis()),
        precise_total_amount_cents: precise_amount.and_then(|markup| {
            record
                .response_cost
                .and_then(|cost| precise_total_amount_cents(cost, markup))
        }),
        properties: Properties {
            model: &record.model,
            response_cost: record.response_cost,
            input_tokens: record.input_tokens,
            output_tokens: record.output_tokens,
            total_tokens: record.total_tokens(),
            prompt_tokens: record.input_tokens,
            completion_tokens: record.output_tokens,
            cache_read_input_tokens: Some(record.cache_read_input_tokens),
            cache_creation_input_tokens: Some(record.cache_creation_input_tokens),
            reasoning_tokens: Some(record.reasoning_tokens),
        },
    };
    event.to_json()
}

impl LagoEvent<'_> {
    /// The event's JSON: fields in declaration order, absent options left out, strings escaped
    /// and floats printed as serde_json does.
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"{\"transaction_id\":");
        json_str(&mut out, self.transaction_id);
        out.extend_from_slice(b",\"external_subscription_id\":");
        json_str(&mut out, self.external_subscription_id);
        out.extend_from_slice(b",\"code\":");
        json_str(&mut out, self.code);
        out.extend_from_slice(b",\"timestamp\":");
        json_str(&mut out, &self.timestamp);
        if let Some(cents) = &self.precise_total_amount_cents {
            out.extend_from_slice(b",\"precise_total_amount_cents\":");
            json_str(&mut out, cents);
        }
        let p = &self.properties;
        out.extend_from_slice(b",\"properties\":{\"model\":");
        json_str(&mut out, p.model);
        if let Some(cost) = p.response_cost {
            out.extend_from_slice(b",\"response_cost\":");
            // Finite (validated at parse); serde_json writes a non-finite one as null anyway.
            let _ = serde_json::to_writer(&mut out, &cost);
        }
        let mut int = |key: &[u8], v: Option<u64>| {
            if let Some(v) = v {
                out.extend_from_slice(key);
                out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            }
        };
        int(b",\"input_tokens\":", Some(p.input_tokens));
        int(b",\"output_tokens\":", Some(p.output_tokens));
        int(b",\"total_tokens\":", Some(p.total_tokens));
        int(b",\"prompt_tokens\":", Some(p.prompt_tokens));
        int(b",\"completion_tokens\":", Some(p.completion_tokens));
        int(b",\"cache_read_input_tokens\":", p.cache_read_input_tokens);
        int(
            b",\"cache_creation_input_tokens\":",
            p.cache_creation_input_tokens,
        );
        int(b",\"reasoning_tokens\":", p.reasoning_tokens);
        out.extend_from_slice(b"}}");
        out
    }
}

/// `s` as a JSON string. Ids and model names rarely need escaping: those are copied as they are,
/// the rest go through serde_json's escaper.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Unix seconds with exactly three decimals, as a string: `"1764237600.250"`. Lago reads a
/// numeric string as seconds and keeps millisecond precision; an integer string would lose the
/// milliseconds, a float could print differently across builds.
pub fn lago_timestamp(millis: i64) -> String {
    let sign = if millis < 0 { "-" } else { "" };
    let abs = millis.unsigned_abs();
    format!("{sign}{}.{:03}", abs / 1000, abs % 1000)
}

/// The milliseconds of a [`lago_timestamp`] (`"1764237600.250"`), as stored events carry it.
pub fn parse_lago_timestamp(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = digits.split_once('.').unwrap_or((digits, "0"));
    if secs.is_empty() || frac.is_empty() || frac.len() > 3 {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let frac: i64 = format!("{frac:0<3}").parse().ok()?;
    let ms = secs.checked_mul(1000)?.checked_add(frac)?;
    Some(if negative { -ms } else { ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_writer_gives_serdes_bytes() {
        let strings = [
            "tx-1",
            "",
            "quote\" and backslash \\",
            "tab\tnewline\ncontrol\u{1}\u{1f}",
            "ünïcödé 日本 🦀",
            "slash / and del \u{7f}",
        ];
        let costs = [
            None,
            Some(0.0),
            Some(0.0001675),
            Some(1e-7),
            Some(123.0),
            Some(1e21),
        ];
        let counts = [None, Some(0), Some(u64::MAX)];
        for (i, s) in strings.iter().enumerate() {
            for (j, cost) in costs.iter().enumerate() {
                let count = counts[(i + j) % counts.len()];
                let event = LagoEvent {
                    transaction_id: s,
                    external_subscription_id: strings[(i + 1) % strings.len()],
                    code: strings[(i + 2) % strings.len()],
                    timestamp: lago_timestamp(1_764_237_600_250 - i as i64),
                    precise_total_amount_cents: (j % 2 == 0).then(|| format!("{j}.5")),
                    properties: Properties {
                        model: strings[(i + j) % strings.len()],
                        response_cost: *cost,
                        input_tokens: i as u64,
                        output_tokens: j as u64,
                        total_tokens: u64::MAX,
                        prompt_tokens: 0,
                        completion_tokens: 7,
                        cache_read_input_tokens: count,
                        cache_creation_input_tokens: counts[j % counts.len()],
                        reasoning_tokens: count.map(|c| c / 2),
                    },
                };
                assert_eq!(
                    String::from_utf8(event.to_json()).unwrap(),
                    serde_json::to_string(&event).unwrap(),
                    "string {i}, cost {j}"
                );
            }
        }
    }

    #[test]
    fn lago_timestamps_read_back_to_their_milliseconds() {
        for ms in [0, 1, 999, 1_000, 1_764_237_600_250, -1_500] {
            assert_eq!(parse_lago_timestamp(&lago_timestamp(ms)), Some(ms), "{ms}");
        }
        assert_eq!(parse_lago_timestamp("1764237600"), Some(1_764_237_600_000));
        assert_eq!(
            parse_lago_timestamp("1764237600.5"),
            Some(1_764_237_600_500)
        );
        for bad in ["", ".5", "1.", "1.2345", "x.250", "1.2x"] {
            assert_eq!(parse_lago_timestamp(bad), None, "{bad}");
        }
    }

    fn record() -> SpendRecord {
        let line = br#"{"schema":1,"transaction_id":"tx-1","start_time":"2026-11-27T10:00:00.000Z","end_time":"2026-11-27T10:00:00.250Z","model":"gpt-4o","input_tokens":7,"output_tokens":15,"total_tokens":22,"response_cost":0.0001675,"end_user_id":"cust-1","user_id":null,"team_id":"team-a","status":"success"}"#;
        SpendRecord::parse_line(line).unwrap()
    }

    fn spec(charge_by: &str) -> EventSpec {
        EventSpec {
            code: "llm_usage".into(),
            charge_by: charge_by.parse().unwrap(),
            precise_amount: None,
        }
    }

    #[test]
    fn event_is_exactly_the_documented_shape() {
        let p = prepare(&record(), &spec("end_user_id"));
        let Disposition::Pending {
            event,
            external_subscription_id,
            code,
            time_ms,
        } = p.disposition
        else {
            panic!("expected pending")
        };
        assert_eq!(external_subscription_id, "cust-1");
        assert_eq!((code.as_str(), time_ms), ("llm_usage", 1_795_773_600_250));
        assert_eq!(
            String::from_utf8(event).unwrap(),
            r#"{"transaction_id":"tx-1","external_subscription_id":"cust-1","code":"llm_usage","timestamp":"1795773600.250","properties":{"model":"gpt-4o","response_cost":0.0001675,"input_tokens":7,"output_tokens":15,"total_tokens":22,"prompt_tokens":7,"completion_tokens":15,"cache_read_input_tokens":0,"cache_creation_input_tokens":0,"reasoning_tokens":0}}"#
        );
    }

    #[test]
    fn same_record_same_bytes_and_null_cost_is_omitted() {
        let mut r = record();
        r.response_cost = None;
        r.total_tokens = None;
        let a = event_bytes(&r, "c", "s");
        let b = event_bytes(&r.clone(), "c", "s");
        assert_eq!(a, b);
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert!(v["properties"].get("response_cost").is_none());
        assert_eq!(v["properties"]["total_tokens"], 22);
    }

    #[test]
    fn token_classes_and_the_precise_amount_are_sent() {
        let mut r = record();
        r.input_tokens = 12_050;
        r.cache_read_input_tokens = 10_000;
        r.cache_creation_input_tokens = 2_000;
        r.reasoning_tokens = 40;
        r.response_cost = Some(0.015525);
        let mut s = spec("end_user_id");
        s.precise_amount = Some("1.2".parse().unwrap());
        let Disposition::Pending { event, .. } = prepare(&r, &s).disposition else {
            panic!("expected pending")
        };
        let v: serde_json::Value = serde_json::from_slice(&event).unwrap();
        assert_eq!(v["precise_total_amount_cents"], "1.863");
        assert_eq!(v["properties"]["cache_read_input_tokens"], 10_000);
        assert_eq!(v["properties"]["cache_creation_input_tokens"], 2_000);
        assert_eq!(v["properties"]["reasoning_tokens"], 40);
        // Same record, same spec: the same bytes; and a re-resolve keeps the amount.
        let Disposition::Pending { event: again, .. } = prepare(&r, &s).disposition else {
            panic!()
        };
        assert_eq!(event, again);
        assert_eq!(
            re_resolve_event(&event, &CustomerIds::of(&r), &s),
            Some(prepare(&r, &s).disposition)
        );
        // Off by default; an unpriced record carries no amount even when it is on.
        let off = event_bytes(&r, "c", "s");
        assert!(!String::from_utf8_lossy(&off).contains("precise_total_amount_cents"));
        r.response_cost = None;
        let unpriced = event_bytes_with(&r, "c", "s", s.precise_amount);
        assert!(!String::from_utf8_lossy(&unpriced).contains("precise_total_amount_cents"));
    }

    #[test]
    fn timestamps_have_exactly_three_decimals() {
        assert_eq!(lago_timestamp(1_764_237_600_250), "1764237600.250");
        assert_eq!(lago_timestamp(1_764_237_600_000), "1764237600.000");
        assert_eq!(lago_timestamp(5), "0.005");
        assert_eq!(lago_timestamp(-1_500), "-1.500");
    }

    #[test]
    fn charge_by_fallback_list_takes_first_non_empty() {
        let mut r = record();
        r.team_id = Some("  ".into());
        r.user_id = Some("user-9".into());
        assert_eq!(spec("team_id,user_id").charge_by.resolve(&r), Ok("user-9"));
        r.team_id = Some("team-z".into());
        assert_eq!(spec("team_id,user_id").charge_by.resolve(&r), Ok("team-z"));
    }

    #[test]
    fn no_id_is_held_with_a_reason_naming_the_setting() {
        let mut r = record();
        r.team_id = None;
        let p = prepare(&r, &spec("team_id"));
        assert_eq!(
            p.disposition,
            Disposition::Held {
                reason: "no team_id on this record; LAGO_API_CHARGE_BY=team_id".into()
            }
        );
        let p = prepare(&r, &spec("team_id, user_id"));
        let Disposition::Held { reason } = p.disposition else {
            panic!()
        };
        assert_eq!(
            reason,
            "no team_id or user_id on this record; LAGO_API_CHARGE_BY=team_id,user_id"
        );
    }

    #[test]
    fn failures_are_not_billable() {
        let mut r = record();
        r.status = Status::Failure;
        assert!(matches!(
            prepare(&r, &spec("end_user_id")).disposition,
            Disposition::NotBillable { .. }
        ));
    }

    #[test]
    fn charge_by_parsing() {
        assert_eq!(
            "team_id,user_id".parse::<ChargeBy>().unwrap().fields(),
            &[IdField::TeamId, IdField::UserId]
        );
        assert!(matches!(
            "team".parse::<ChargeBy>(),
            Err(ChargeByError::Unknown(_))
        ));
        assert!(matches!(
            "team_id,team_id".parse::<ChargeBy>(),
            Err(ChargeByError::Repeated("team_id"))
        ));
        assert_eq!("".parse::<ChargeBy>(), Err(ChargeByError::Empty));
        assert!("team_id,".parse::<ChargeBy>().is_err());
    }

    #[test]
    fn content_hash_is_stable_across_builds() {
        // A stored hash must match the same line read by a later build.
        assert_eq!(content_hash(b""), content_hash(b""));
        assert_eq!(content_hash(b"abc"), 3_764_064_793_658_376_833);
        assert_ne!(content_hash(b"abc"), content_hash(b"abd"));
        assert_ne!(content_hash(b"abc"), content_hash(b"abc\0"));
    }

    #[test]
    fn content_hash_differs_when_content_does() {
        let a = prepare(&record(), &spec("end_user_id"));
        let mut r = record();
        r.input_tokens = 8;
        let b = prepare(&r, &spec("end_user_id"));
        assert_ne!(a.content_hash, b.content_hash);
        assert_eq!(
            a.content_hash,
            prepare(&record(), &spec("team_id")).content_hash
        );
        let line = record().to_line();
        assert_eq!(
            prepare_line(&record(), &line[..line.len() - 1], &spec("user_id")).content_hash,
            a.content_hash
        );
    }

    #[test]
    fn re_resolving_a_stored_event_keeps_everything_but_customer_and_code() {
        let original = prepare(&record(), &spec("end_user_id"));
        let Disposition::Pending { event, .. } = &original.disposition else {
            panic!()
        };
        // Same spec: same bytes.
        assert_eq!(
            re_resolve_event(event, &original.customer_ids, &spec("end_user_id")),
            Some(original.disposition.clone())
        );
        // Another charge-by: the same event as if built that way from the record.
        let by_team = prepare(&record(), &spec("team_id"));
        assert_eq!(
            re_resolve_event(event, &original.customer_ids, &spec("team_id")),
            Some(by_team.disposition)
        );
        assert!(matches!(
            re_resolve_event(event, &original.customer_ids, &spec("user_id")),
            Some(Disposition::Held { .. })
        ));
        assert_eq!(original.record_json, None);
    }
}
