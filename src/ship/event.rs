//! The Lago event of a billable record: what it says ([`EventBody`]) and its exact bytes
//! ([`EventBody::to_json`]).
//!
//! The outbox queues an event as its fields (columns of `pending`, see `outbox/schema.rs`) and
//! writes the JSON when it is claimed for sending, with this one deterministic writer: fixed field
//! order, serde_json's shortest float form, the timestamp as a string with exactly three
//! decimals. Every resend of an event is therefore the same bytes, with the same
//! `transaction_id` and the same explicit `timestamp`, which is what lets both Lago stores
//! (Postgres: 422 `value_already_exist`; ClickHouse: later dedupe on id + timestamp) absorb it.

use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;

use crate::ship::amount::{Markup, precise_total_amount_cents};
use crate::spend::SpendRecord;

/// Everything a Lago event says besides its `transaction_id`, customer and code.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBody {
    /// The event's `timestamp` (the record's `end_time`), in ms since the epoch.
    pub time_ms: i64,
    /// `precise_total_amount_cents`, when `TALLY_PRECISE_AMOUNT` is on and the record is priced.
    pub precise_total_amount_cents: Option<String>,
    pub model: String,
    pub response_cost: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    /// `None` only for an event stored before tally sent the token classes.
    pub cache_read_input_tokens: Option<u64>,
    pub cache_creation_input_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

impl EventBody {
    /// The body of `record`'s event; with `precise_amount` set, a priced record's carries
    /// `precise_total_amount_cents` (cost × 100 × markup).
    pub fn of(record: &SpendRecord, precise_amount: Option<Markup>) -> Self {
        Self {
            time_ms: record.end_time.timestamp_millis(),
            precise_total_amount_cents: precise_amount.and_then(|markup| {
                record
                    .response_cost
                    .and_then(|cost| precise_total_amount_cents(cost, markup))
            }),
            model: record.model.clone(),
            response_cost: record.response_cost,
            input_tokens: record.input_tokens,
            output_tokens: record.output_tokens,
            total_tokens: record.total_tokens(),
            cache_read_input_tokens: Some(record.cache_read_input_tokens),
            cache_creation_input_tokens: Some(record.cache_creation_input_tokens),
            reasoning_tokens: Some(record.reasoning_tokens),
        }
    }

    /// [`EventBody::of`], taking the record's model instead of copying it (the record is being
    /// taken apart).
    pub fn take(record: &mut SpendRecord, precise_amount: Option<Markup>) -> Self {
        let model = std::mem::take(&mut record.model);
        Self {
            model,
            ..Self::of(record, precise_amount)
        }
    }

    /// The event's JSON, as sent to Lago (docs/architecture.md, "From record to Lago event").
    pub fn to_json(
        &self,
        transaction_id: &str,
        external_subscription_id: &str,
        code: &str,
    ) -> Vec<u8> {
        self.lago_event(transaction_id, external_subscription_id, code)
            .to_json()
    }

    fn lago_event<'a>(
        &'a self,
        transaction_id: &'a str,
        external_subscription_id: &'a str,
        code: &'a str,
    ) -> LagoEvent<'a> {
        LagoEvent {
            transaction_id,
            external_subscription_id,
            code,
            time_ms: self.time_ms,
            precise_total_amount_cents: self.precise_total_amount_cents.as_deref(),
            properties: Properties {
                model: &self.model,
                response_cost: self.response_cost,
                input_tokens: self.input_tokens,
                output_tokens: self.output_tokens,
                total_tokens: self.total_tokens,
                prompt_tokens: self.input_tokens,
                completion_tokens: self.output_tokens,
                cache_read_input_tokens: self.cache_read_input_tokens,
                cache_creation_input_tokens: self.cache_creation_input_tokens,
                reasoning_tokens: self.reasoning_tokens,
            },
        }
    }

    /// The body of an event stored as JSON (a dead event, or one queued by a tally before v7 of
    /// the outbox); `None` when it is not an event this writer wrote.
    pub fn from_json(event: &[u8]) -> Option<Self> {
        let stored: StoredEvent = serde_json::from_slice(event).ok()?;
        let p = stored.properties;
        Some(Self {
            time_ms: parse_lago_timestamp(&stored.timestamp)?,
            precise_total_amount_cents: stored.precise_total_amount_cents,
            model: p.model,
            response_cost: p.response_cost,
            input_tokens: p.input_tokens,
            output_tokens: p.output_tokens,
            total_tokens: p.total_tokens,
            cache_read_input_tokens: p.cache_read_input_tokens,
            cache_creation_input_tokens: p.cache_creation_input_tokens,
            reasoning_tokens: p.reasoning_tokens,
        })
    }
}

/// A Lago event, borrowed from wherever its parts are (an [`EventBody`], or a queue row the
/// claim reads without copying), written by [`LagoEvent::to_json`] (serde's derive would give
/// the same bytes, which a test checks, at about twice the cost: every key goes through its
/// escaper).
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct LagoEvent<'a> {
    pub transaction_id: &'a str,
    pub external_subscription_id: &'a str,
    pub code: &'a str,
    /// Written as [`lago_timestamp`].
    #[cfg_attr(test, serde(rename = "timestamp", serialize_with = "timestamp_string"))]
    pub time_ms: i64,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub precise_total_amount_cents: Option<&'a str>,
    pub properties: Properties<'a>,
}

#[cfg(test)]
fn timestamp_string<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&lago_timestamp(*ms))
}

#[cfg_attr(test, derive(Serialize))]
pub(crate) struct Properties<'a> {
    pub model: &'a str,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub response_cost: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub cache_read_input_tokens: Option<u64>,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub cache_creation_input_tokens: Option<u64>,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub reasoning_tokens: Option<u64>,
}

impl LagoEvent<'_> {
    /// The event's JSON: fields in declaration order, absent options left out, strings escaped
    /// and floats printed as serde_json does.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"{\"transaction_id\":");
        json_str(&mut out, self.transaction_id);
        out.extend_from_slice(b",\"external_subscription_id\":");
        json_str(&mut out, self.external_subscription_id);
        out.extend_from_slice(b",\"code\":");
        json_str(&mut out, self.code);
        out.extend_from_slice(b",\"timestamp\":\"");
        write_lago_timestamp(&mut out, self.time_ms);
        out.push(b'"');
        if let Some(cents) = self.precise_total_amount_cents {
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
    if crate::text::json_plain_len(s.as_bytes()) < s.len() {
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
    let mut out = Vec::with_capacity(24);
    write_lago_timestamp(&mut out, millis);
    String::from_utf8(out).unwrap_or_default()
}

/// [`lago_timestamp`], appended to `out` (the claim writes one per event).
fn write_lago_timestamp(out: &mut Vec<u8>, millis: i64) {
    if millis < 0 {
        out.push(b'-');
    }
    let abs = millis.unsigned_abs();
    out.extend_from_slice(itoa::Buffer::new().format(abs / 1000).as_bytes());
    let frac = abs % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
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

#[derive(Deserialize)]
struct StoredEvent {
    timestamp: String,
    #[serde(default)]
    precise_total_amount_cents: Option<String>,
    properties: StoredProperties,
}

/// `prompt_tokens` and `completion_tokens` are not read: the writer sends the input and output
/// counts under those names too.
#[derive(Deserialize)]
struct StoredProperties {
    model: String,
    #[serde(default)]
    response_cost: Option<f64>,
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    /// Absent from events stored before the token classes were sent: re-resolved without them.
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
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
                let amount = format!("{j}.5");
                let event = LagoEvent {
                    transaction_id: s,
                    external_subscription_id: strings[(i + 1) % strings.len()],
                    code: strings[(i + 2) % strings.len()],
                    time_ms: 1_764_237_600_250 - i as i64,
                    precise_total_amount_cents: (j % 2 == 0).then_some(amount.as_str()),
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
    fn a_stored_event_reads_back_to_the_body_that_wrote_it() {
        let counts = [None, Some(0), Some(u64::MAX)];
        for (i, cost) in [None, Some(0.0001675), Some(1e21)].into_iter().enumerate() {
            let body = EventBody {
                time_ms: 1_764_237_600_250 - i as i64 * 7,
                precise_total_amount_cents: (i % 2 == 0).then(|| "1.863".to_owned()),
                model: "gpt-\"4o\"".into(),
                response_cost: cost,
                input_tokens: 7,
                output_tokens: u64::MAX,
                total_tokens: 22,
                cache_read_input_tokens: counts[i],
                cache_creation_input_tokens: counts[(i + 1) % 3],
                reasoning_tokens: counts[(i + 2) % 3],
            };
            let json = body.to_json("tx-1", "cust", "llm");
            assert_eq!(EventBody::from_json(&json), Some(body.clone()));
        }
        assert_eq!(EventBody::from_json(b"{}"), None);
        assert_eq!(EventBody::from_json(b"not json"), None);
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

    #[test]
    fn timestamps_have_exactly_three_decimals() {
        assert_eq!(lago_timestamp(1_764_237_600_250), "1764237600.250");
        assert_eq!(lago_timestamp(1_764_237_600_000), "1764237600.000");
        assert_eq!(lago_timestamp(5), "0.005");
        assert_eq!(lago_timestamp(-1_500), "-1.500");
    }
}
