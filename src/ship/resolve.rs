//! From a spend record to what the outbox stores: who is charged (`LAGO_API_CHARGE_BY`) and the
//! Lago event's content ([`crate::ship::event`] writes its bytes when it is sent).
//!
//! Resolving is deterministic: a re-resolve by `tally queue retry` yields the same event for the
//! same inputs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ship::amount::Markup;
use crate::ship::event::EventBody;
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
    /// Billable, with a customer: send this event (to `external_subscription_id`, under
    /// `code`, saying `body`).
    Pending {
        external_subscription_id: String,
        code: String,
        body: EventBody,
    },
    /// Billable, but no id for the charge-by setting: kept, not sent, until retried.
    Held { reason: String },
    /// Not billed (`status` other than `success`); remembered so a re-read is recognised.
    NotBillable { status: Status },
}

/// A parsed record, ready for [`crate::ship::outbox::Outbox::ingest`].
///
/// Only what delivery and the operator commands need is kept: the event's content and the
/// customer ids for a pending record, the whole record only while it is held (its event cannot be
/// built yet). That keeps the outbox small and the ingest fast.
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
pub fn prepare_line(record: SpendRecord, line: &[u8], spec: &EventSpec) -> PreparedRecord {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    build(record, content_hash(line), spec)
}

/// Prepares a record that did not come from a tally spend-log line (e.g. converted from another
/// format); the hash is of its canonical serialization.
pub fn prepare(record: &SpendRecord, spec: &EventSpec) -> PreparedRecord {
    let line = record.to_line();
    build(record.clone(), content_hash(&line[..line.len() - 1]), spec)
}

/// Takes the record apart: its strings move into what is kept, none is copied but the
/// charged customer's id.
fn build(mut record: SpendRecord, content_hash: i64, spec: &EventSpec) -> PreparedRecord {
    let unpriced = record.is_billable() && record.response_cost.is_none();
    let disposition = match resolved(&record, spec) {
        Some(Ok(id)) => {
            let external_subscription_id = id.to_owned();
            Disposition::Pending {
                external_subscription_id,
                code: spec.code.clone(),
                body: EventBody::take(&mut record, spec.precise_amount),
            }
        }
        _ => disposition(&record, spec),
    };
    let record_json = matches!(disposition, Disposition::Held { .. })
        .then(|| serde_json::to_vec(&record).unwrap_or_default());
    PreparedRecord {
        transaction_id: std::mem::take(&mut record.transaction_id),
        content_hash,
        customer_ids: CustomerIds {
            end_user_id: record.end_user_id.take(),
            user_id: record.user_id.take(),
            team_id: record.team_id.take(),
        },
        record_json,
        disposition,
        unpriced,
    }
}

/// The charged customer's id of a billable record (`None`: not billable).
fn resolved<'r>(record: &'r SpendRecord, spec: &EventSpec) -> Option<Result<&'r str, String>> {
    record.is_billable().then(|| spec.charge_by.resolve(record))
}

/// The disposition alone (used again by `retry` with a new charge-by).
pub fn disposition(record: &SpendRecord, spec: &EventSpec) -> Disposition {
    match resolved(record, spec) {
        None => Disposition::NotBillable {
            status: record.status.clone(),
        },
        Some(Ok(id)) => Disposition::Pending {
            external_subscription_id: id.to_owned(),
            code: spec.code.clone(),
            body: EventBody::of(record, spec.precise_amount),
        },
        Some(Err(reason)) => Disposition::Held { reason },
    }
}

/// Re-resolves an event (pending or dead) with `spec`: same transaction id, timestamp and
/// properties; customer and code as `spec` says now.
pub fn re_resolve(body: EventBody, ids: &CustomerIds, spec: &EventSpec) -> Disposition {
    match spec.charge_by.resolve_ids(
        ids.end_user_id.as_deref(),
        ids.user_id.as_deref(),
        ids.team_id.as_deref(),
    ) {
        Ok(id) => Disposition::Pending {
            external_subscription_id: id.to_owned(),
            code: spec.code.clone(),
            body,
        },
        Err(reason) => Disposition::Held { reason },
    }
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

/// The Lago event for a record, as JSON bytes (docs/architecture.md, "From record to Lago event"):
/// what the tests compare with. The shipper writes it from the queue's columns when it sends.
#[cfg(test)]
pub(crate) fn event_bytes(
    record: &SpendRecord,
    code: &str,
    external_subscription_id: &str,
) -> Vec<u8> {
    event_bytes_with(record, code, external_subscription_id, None)
}

/// Same, with `precise_total_amount_cents` (cost × 100 × markup) when `precise_amount` is set
/// and the record is priced; an unpriced record's event carries no amount.
#[cfg(test)]
pub(crate) fn event_bytes_with(
    record: &SpendRecord,
    code: &str,
    external_subscription_id: &str,
    precise_amount: Option<Markup>,
) -> Vec<u8> {
    EventBody::of(record, precise_amount).to_json(
        &record.transaction_id,
        external_subscription_id,
        code,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
            external_subscription_id,
            code,
            body,
        } = p.disposition
        else {
            panic!("expected pending")
        };
        assert_eq!(external_subscription_id, "cust-1");
        assert_eq!(
            (code.as_str(), body.time_ms),
            ("llm_usage", 1_795_773_600_250)
        );
        assert_eq!(
            String::from_utf8(body.to_json("tx-1", &external_subscription_id, &code)).unwrap(),
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
        let Disposition::Pending { body, .. } = prepare(&r, &s).disposition else {
            panic!("expected pending")
        };
        let event = body.to_json("tx-1", "cust-1", "llm_usage");
        assert_eq!(
            event,
            event_bytes_with(&r, "llm_usage", "cust-1", s.precise_amount)
        );
        let v: serde_json::Value = serde_json::from_slice(&event).unwrap();
        assert_eq!(v["precise_total_amount_cents"], "1.863");
        assert_eq!(v["properties"]["cache_read_input_tokens"], 10_000);
        assert_eq!(v["properties"]["cache_creation_input_tokens"], 2_000);
        assert_eq!(v["properties"]["reasoning_tokens"], 40);
        // A re-resolve keeps the amount.
        assert_eq!(
            re_resolve(body, &CustomerIds::of(&r), &s),
            prepare(&r, &s).disposition
        );
        // Off by default; an unpriced record carries no amount even when it is on.
        let off = event_bytes(&r, "c", "s");
        assert!(!String::from_utf8_lossy(&off).contains("precise_total_amount_cents"));
        r.response_cost = None;
        let unpriced = event_bytes_with(&r, "c", "s", s.precise_amount);
        assert!(!String::from_utf8_lossy(&unpriced).contains("precise_total_amount_cents"));
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

    /// The record is taken apart, not copied: whatever it becomes (pending, held, not billable,
    /// unpriced), it is what the borrowing functions say of the same record.
    #[test]
    fn a_record_taken_apart_is_prepared_as_the_borrowing_functions_say() {
        let mut held = record();
        held.end_user_id = None;
        let mut failed = record();
        failed.status = Status::Failure;
        let mut unpriced = record();
        unpriced.response_cost = None;
        for r in [record(), held, failed, unpriced] {
            let spec = spec("end_user_id");
            let line = r.to_line();
            let line = &line[..line.len() - 1];
            let expected = PreparedRecord {
                transaction_id: r.transaction_id.clone(),
                content_hash: content_hash(line),
                customer_ids: CustomerIds::of(&r),
                record_json: r
                    .end_user_id
                    .is_none()
                    .then(|| serde_json::to_vec(&r).unwrap()),
                disposition: disposition(&r, &spec),
                unpriced: r.response_cost.is_none(),
            };
            assert_eq!(prepare_line(r, line, &spec), expected);
        }
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
            prepare_line(record(), &line[..line.len() - 1], &spec("user_id")).content_hash,
            a.content_hash
        );
    }

    #[test]
    fn re_resolving_a_stored_event_keeps_everything_but_customer_and_code() {
        let original = prepare(&record(), &spec("end_user_id"));
        let Disposition::Pending { body, .. } = &original.disposition else {
            panic!()
        };
        let again =
            |charge_by: &str| re_resolve(body.clone(), &original.customer_ids, &spec(charge_by));
        // Same spec: the same event.
        assert_eq!(again("end_user_id"), original.disposition);
        // Another charge-by: the same event as if built that way from the record.
        assert_eq!(
            again("team_id"),
            prepare(&record(), &spec("team_id")).disposition
        );
        assert!(matches!(again("user_id"), Disposition::Held { .. }));
        assert_eq!(original.record_json, None);
    }
}
