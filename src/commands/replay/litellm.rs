//! `--format litellm`: rows of LiteLLM's `LiteLLM_SpendLogs` table, exported as JSON lines, turned
//! into tally spend records so a LiteLLM user can backfill Lago from history they already have.
//!
//! The mapping (LiteLLM column → record field):
//! - `request_id` → `transaction_id` (so a row replayed twice is billed once);
//! - `endTime` → `end_time` (the event's timestamp; `startTime` when `endTime` is missing),
//!   `startTime` → `start_time`; ISO 8601 with or without an offset (none means UTC), `T` or space;
//! - `model_group` (the name the client asked for) → `model`, `model` → `upstream_model`;
//!   `model` alone when there is no `model_group`;
//! - `prompt_tokens` / `completion_tokens` / `total_tokens` → `input_tokens` / `output_tokens` /
//!   `total_tokens`; `spend` → `response_cost`; the token classes (`cache_read_input_tokens`,
//!   `cache_creation_input_tokens`, `reasoning_tokens`) from `metadata.usage_object`, LiteLLM's
//!   copy of the provider's usage, read by the proxy's own usage parser (0 when absent);
//! - `end_user` → `end_user_id`; `user` → `user_id`; `team_id` → `team_id`; when those are empty,
//!   `metadata.user_api_key_user_id` / `user_api_key_team_id`; `metadata.user_api_key_alias` →
//!   `key_alias` (`metadata` may be an object or a JSON string holding one);
//! - `api_key` → `key_hash` only when it is a SHA-256 hex digest (LiteLLM stores the hash); any
//!   other value is dropped so a raw key can never reach the spend log or Lago;
//! - `status` → `status`: `success` when LiteLLM says success or nothing.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::proxy::usage::Usage;
use crate::spend::{RecordError, SCHEMA_VERSION, SpendRecord, Status};

/// Why a LiteLLM row could not be turned into a record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LitellmError {
    #[error("line is not valid UTF-8 (byte {valid_up_to} of the line)")]
    NotUtf8 { valid_up_to: usize },
    #[error("line is empty")]
    Empty,
    #[error("not a LiteLLM_SpendLogs row: {0}")]
    Json(String),
    #[error("LiteLLM row field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("LiteLLM row converts to an invalid record: {0}")]
    Record(#[from] RecordError),
}

fn field(field: &'static str, reason: impl Into<String>) -> LitellmError {
    LitellmError::Field {
        field,
        reason: reason.into(),
    }
}

/// Converts one exported row (one line, without its newline) into a validated spend record.
pub fn parse_line(line: &[u8]) -> Result<SpendRecord, LitellmError> {
    let text = std::str::from_utf8(line).map_err(|e| LitellmError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(LitellmError::Empty);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| LitellmError::Json(e.to_string()))?;
    let Value::Object(row) = value else {
        return Err(LitellmError::Json("expected a JSON object".into()));
    };
    to_record(&row)
}

/// Converts one row (already parsed as a JSON object).
pub fn to_record(row: &Map<String, Value>) -> Result<SpendRecord, LitellmError> {
    let metadata = metadata(row)?;
    let meta_str = |key: &str| metadata.as_ref().and_then(|m| non_empty_str(m.get(key)));

    let transaction_id = non_empty_str(row.get("request_id"))
        .ok_or_else(|| field("request_id", "missing or empty; it is the row's unique id"))?;
    let start_time = opt_time(row, "startTime")?;
    let end_time = match opt_time(row, "endTime")? {
        Some(t) => t,
        None => start_time.ok_or_else(|| field("endTime", "missing, and no startTime either"))?,
    };
    let upstream = non_empty_str(row.get("model"));
    let model_group = non_empty_str(row.get("model_group"));
    let (model, upstream_model) = match (model_group, upstream) {
        (Some(group), upstream) => (group, upstream),
        (None, Some(upstream)) => (upstream, None),
        (None, None) => return Err(field("model", "missing or empty")),
    };
    let input_tokens = tokens(row, "prompt_tokens")?.unwrap_or(0);
    let output_tokens = tokens(row, "completion_tokens")?.unwrap_or(0);
    let total_tokens = tokens(row, "total_tokens")?;
    // Best effort: a usage object that does not read as usage leaves the classes at 0.
    let classes: Usage = metadata
        .as_ref()
        .and_then(|m| m.get("usage_object"))
        .and_then(|u| Usage::deserialize(u).ok())
        .unwrap_or_default();
    let response_cost = match row.get("spend") {
        None | Some(Value::Null) => None,
        Some(v) => Some(number(v).ok_or_else(|| field("spend", format!("{v} is not a number")))?),
    };
    let status = match non_empty_str(row.get("status")) {
        None => Status::Success,
        Some(s) => Status::from(s.to_ascii_lowercase()),
    };
    let duration_ms = start_time
        .and_then(|s| (end_time - s).num_milliseconds().try_into().ok())
        .filter(|_| start_time.is_some_and(|s| s <= end_time));
    let record = SpendRecord {
        schema: SCHEMA_VERSION,
        transaction_id,
        start_time,
        end_time,
        call_type: call_type(non_empty_str(row.get("call_type")).as_deref()),
        model,
        upstream_model,
        input_tokens,
        output_tokens,
        total_tokens,
        cache_read_input_tokens: classes.cache_read_tokens,
        cache_creation_input_tokens: classes.cache_creation_tokens,
        reasoning_tokens: classes.reasoning_tokens,
        usage_estimated: false,
        response_cost,
        end_user_id: non_empty_str(row.get("end_user")),
        user_id: non_empty_str(row.get("user")).or_else(|| meta_str("user_api_key_user_id")),
        team_id: non_empty_str(row.get("team_id")).or_else(|| meta_str("user_api_key_team_id")),
        key_alias: meta_str("user_api_key_alias"),
        key_hash: non_empty_str(row.get("api_key")).filter(|k| is_sha256_hex(k)),
        stream: matches!(row.get("stream"), Some(Value::Bool(true))),
        status,
        duration_ms,
    };
    record.validate()?;
    Ok(record)
}

/// `metadata` is a JSON column: exports give it as an object, or as a string holding one.
fn metadata(row: &Map<String, Value>) -> Result<Option<Map<String, Value>>, LitellmError> {
    match row.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(Value::Null) => Ok(None),
            Ok(_) => Err(field(
                "metadata",
                "is a JSON string that does not hold an object",
            )),
            Err(e) => Err(field("metadata", format!("is a string but not JSON: {e}"))),
        },
        Some(_) => Err(field("metadata", "expected an object or a JSON string")),
    }
}

/// A string value with surrounding blanks removed; `None` for null, empty or non-string values
/// (LiteLLM writes `""` for "no end user", which must not become a customer id).
fn non_empty_str(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Token counts: integers, integral floats (`12.0`, as some exports write them) or numeric
/// strings; negative or fractional values are refused.
fn tokens(row: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, LitellmError> {
    let v = match row.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    if let Some(n) = v.as_u64() {
        return Ok(Some(n));
    }
    match number(v) {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= crate::spend::MAX_TOKENS as f64 => {
            Ok(Some(f as u64))
        }
        _ => Err(field(name, format!("{v} is not a non-negative integer"))),
    }
}

fn opt_time(
    row: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<DateTime<Utc>>, LitellmError> {
    match row.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => parse_time(s)
            .map(Some)
            .ok_or_else(|| field(name, format!("{s:?} is not an ISO 8601 time"))),
        Some(other) => Err(field(name, format!("{other} is not a time string"))),
    }
}

/// ISO 8601 as LiteLLM and Postgres exports write it: with an offset or `Z`, or without (UTC),
/// with `T` or a space between date and time, any number of fractional digits.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| t.and_utc())
}

/// LiteLLM's call types (`acompletion`, `aembedding`, …) in the spend log's vocabulary.
fn call_type(raw: Option<&str>) -> String {
    match raw {
        Some(c) if c.contains("embedding") => "embedding".to_owned(),
        Some("completion" | "acompletion") | None => "chat_completion".to_owned(),
        Some(other) => other.trim_start_matches('a').to_owned(),
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Result<SpendRecord, LitellmError> {
        parse_line(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({
            "request_id": "chatcmpl-1",
            "call_type": "acompletion",
            "api_key": "a".repeat(64),
            "spend": 0.00042,
            "total_tokens": 30,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "startTime": "2026-10-31T23:59:59.500000",
            "endTime": "2026-11-01 00:00:00.250+00:00",
            "model": "gpt-4o-2024-08-06",
            "model_group": "gpt-4o",
            "user": "user-1",
            "team_id": "team-a",
            "end_user": "",
            "status": "success",
            "metadata": {"user_api_key_alias": "prod-key"}
        })
    }

    #[test]
    fn maps_a_full_row() {
        let r = row(base()).unwrap();
        assert_eq!(r.transaction_id, "chatcmpl-1");
        assert_eq!(r.model, "gpt-4o");
        assert_eq!(r.upstream_model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!((r.input_tokens, r.output_tokens), (10, 20));
        assert_eq!(r.total_tokens, Some(30));
        assert_eq!(r.response_cost, Some(0.00042));
        assert_eq!(
            crate::spend::fmt_millis(&r.end_time),
            "2026-11-01T00:00:00.250Z"
        );
        assert_eq!(r.duration_ms, Some(750));
        assert_eq!(r.end_user_id, None, "an empty end_user is no customer id");
        assert_eq!(r.user_id.as_deref(), Some("user-1"));
        assert_eq!(r.team_id.as_deref(), Some("team-a"));
        assert_eq!(r.key_alias.as_deref(), Some("prod-key"));
        assert_eq!(r.key_hash, Some("a".repeat(64)));
        assert_eq!(r.call_type, "chat_completion");
        assert!(r.is_billable());
    }

    #[test]
    fn reads_ids_from_metadata_given_as_a_json_string() {
        let mut v = base();
        v["user"] = json!("");
        v["team_id"] = Value::Null;
        v["metadata"] = json!(
            json!({"user_api_key_user_id": "u-9", "user_api_key_team_id": "t-9",
                   "user_api_key_alias": "k"})
            .to_string()
        );
        let r = row(v).unwrap();
        assert_eq!(r.user_id.as_deref(), Some("u-9"));
        assert_eq!(r.team_id.as_deref(), Some("t-9"));
        assert_eq!(r.key_alias.as_deref(), Some("k"));
    }

    #[test]
    fn reads_the_token_classes_from_the_usage_object() {
        let mut v = base();
        v["metadata"] = json!({"usage_object": {
            "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 6},
            "completion_tokens_details": {"reasoning_tokens": 12},
            "cache_creation_input_tokens": 3}});
        let r = row(v).unwrap();
        assert_eq!(
            (
                r.cache_read_input_tokens,
                r.cache_creation_input_tokens,
                r.reasoning_tokens
            ),
            (6, 3, 12)
        );
        assert_eq!(row(base()).unwrap().cache_read_input_tokens, 0);
    }

    #[test]
    fn never_keeps_a_raw_key() {
        let mut v = base();
        v["api_key"] = json!("sk-1234567890abcdef");
        assert_eq!(row(v).unwrap().key_hash, None);
    }

    #[test]
    fn status_defaults_to_success_and_failures_are_not_billable() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("status");
        assert!(row(v.clone()).unwrap().is_billable());
        v["status"] = json!("failure");
        assert!(!row(v).unwrap().is_billable());
    }

    #[test]
    fn lenient_times_and_numbers() {
        for (s, want) in [
            ("2026-11-01T10:00:00Z", "2026-11-01T10:00:00.000Z"),
            ("2026-11-01T11:00:00.5+01:00", "2026-11-01T10:00:00.500Z"),
            ("2026-11-01 10:00:00", "2026-11-01T10:00:00.000Z"),
            ("2026-11-01T10:00:00.123456", "2026-11-01T10:00:00.123Z"),
        ] {
            let t = parse_time(s).unwrap_or_else(|| panic!("{s}"));
            assert_eq!(crate::spend::fmt_millis(&t), want, "{s}");
        }
        let mut v = base();
        v["prompt_tokens"] = json!(10.0);
        v["completion_tokens"] = json!("20");
        v.as_object_mut().unwrap().remove("endTime");
        let r = row(v).unwrap();
        assert_eq!((r.input_tokens, r.output_tokens), (10, 20));
        assert_eq!(
            crate::spend::fmt_millis(&r.end_time),
            "2026-10-31T23:59:59.500Z",
            "startTime stands in for a missing endTime"
        );
    }

    #[test]
    fn bad_rows_say_which_field() {
        let cases = [
            ("request_id", json!(null), "request_id"),
            ("endTime", json!("last tuesday"), "endTime"),
            ("prompt_tokens", json!(-3), "prompt_tokens"),
            ("spend", json!("lots"), "spend"),
            ("metadata", json!("{not json"), "metadata"),
        ];
        for (name, value, expect) in cases {
            let mut v = base();
            v[name] = value;
            let err = row(v).unwrap_err().to_string();
            assert!(err.contains(expect), "{name}: {err}");
        }
        assert!(parse_line(b"[1,2]").is_err());
        assert_eq!(parse_line(b"  "), Err(LitellmError::Empty));
    }

    #[test]
    fn the_fixture_converts_except_its_one_bad_row() {
        let text = include_str!("../../../fixtures/litellm/spend_logs.jsonl");
        let results: Vec<_> = text.lines().map(|l| parse_line(l.as_bytes())).collect();
        assert_eq!(results.len(), 8);
        let bad: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].to_string().contains("endTime"), "{}", bad[0]);
        let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert!(
            ok.iter()
                .all(|r| r.key_hash.as_deref().is_none_or(is_sha256_hex))
        );
        let embedding = ok.iter().find(|r| r.call_type == "embedding").unwrap();
        assert_eq!(embedding.key_hash, None, "a raw key is dropped");
        assert_eq!(embedding.user_id.as_deref(), Some("user-dana"));
        assert_eq!(ok.iter().filter(|r| !r.is_billable()).count(), 1);
    }
}
