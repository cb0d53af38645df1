//! The spend-log record: the one contract between `tally proxy` (which writes it) and
//! `tally ship` / `tally replay` (which read it).
//!
//! One JSON object per line, `\n`-terminated. Readers accept unknown fields, so a newer proxy can
//! add fields without breaking an older shipper; a newer `schema` number is refused instead, since
//! its meaning may have changed.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod scan;

/// Where the spend log is when nothing says (`TALLY_SPEND_LOG`); the proxy and the shipper must
/// agree on it.
pub const DEFAULT_SPEND_LOG: &str = "./spend.jsonl";
/// The local state directory when nothing says (`TALLY_STATE_DIR`).
pub const DEFAULT_STATE_DIR: &str = "./.tally";

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Token counts above this are treated as corrupt input rather than billed: no model takes a
/// billion tokens in one call, and a bit-flip or a negative number cast to unsigned lands here.
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// A single call costing more than this (USD) is treated as corrupt input, not billed.
pub const MAX_COST_USD: f64 = 1_000_000.0;

/// Longest accepted `transaction_id`; Lago stores it as a string column and echoes it in URLs.
pub const MAX_TRANSACTION_ID_LEN: usize = 256;

/// One completed (or failed) request as the proxy saw it. Only [`Status::Success`] is billed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpendRecord {
    pub schema: u32,
    pub transaction_id: String,
    #[serde(default, with = "opt_millis")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(with = "millis")]
    pub end_time: DateTime<Utc>,
    #[serde(default = "default_call_type")]
    pub call_type: String,
    pub model: String,
    #[serde(default)]
    pub upstream_model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub total_tokens: Option<u64>,
    /// Of `input_tokens`, those read from the provider's prompt cache (0 when none; missing in
    /// records written before the field existed, read as 0).
    #[serde(default)]
    pub cache_read_input_tokens: u64,
    /// Of `input_tokens`, those written to the provider's prompt cache.
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    /// Of `output_tokens`, those spent on reasoning.
    #[serde(default)]
    pub reasoning_tokens: u64,
    #[serde(default)]
    pub usage_estimated: bool,
    #[serde(default)]
    pub response_cost: Option<f64>,
    #[serde(default)]
    pub end_user_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub key_alias: Option<String>,
    #[serde(default)]
    pub key_hash: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub status: Status,
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

fn default_call_type() -> String {
    "chat_completion".to_owned()
}

/// How the call ended, written as the word itself (`"success"`, `"failure"`). Only `Success` is
/// billed; any other word a writer used (LiteLLM's exports have more) is kept as written, so a
/// record reads and writes back byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Status {
    Success,
    Failure,
    Other(String),
}

impl Status {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Other(word) => word,
        }
    }
}

impl From<&str> for Status {
    fn from(word: &str) -> Self {
        match word {
            "success" => Self::Success,
            "failure" => Self::Failure,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl From<String> for Status {
    fn from(word: String) -> Self {
        match word.as_str() {
            "success" => Self::Success,
            "failure" => Self::Failure,
            _ => Self::Other(word),
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(match word {
            std::borrow::Cow::Borrowed(w) => Self::from(w),
            std::borrow::Cow::Owned(w) => Self::from(w),
        })
    }
}

/// Why a spend-log line was refused. The text is shown to operators by `tally queue`, so it says
/// what was wrong and, where it can, what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error(
        "line is not valid UTF-8 (byte {valid_up_to} of the line); the spend log must be UTF-8"
    )]
    NotUtf8 { valid_up_to: usize },
    #[error("line is empty")]
    Empty,
    #[error("invalid record: {0}")]
    Json(String),
    #[error(
        "unsupported schema version {found} (this tally reads {SCHEMA_VERSION}); upgrade tally to read it"
    )]
    UnsupportedSchema { found: u64 },
    #[error("invalid field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

/// The `schema` check alone, for a line that did not parse as a record: a missing, newer or
/// malformed `schema` is named before any other field.
fn check_schema(text: &str) -> Result<(), RecordError> {
    #[derive(Deserialize)]
    struct Probe {
        schema: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_str(text).map_err(|e| RecordError::Json(e.to_string()))?;
    match probe.schema {
        None | Some(serde_json::Value::Null) => {
            Err(RecordError::Json("missing field `schema`".into()))
        }
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {
            Ok(())
        }
        Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => {
            Err(RecordError::UnsupportedSchema {
                found: n.as_u64().unwrap_or_default(),
            })
        }
        Some(other) => Err(RecordError::Field {
            field: "schema",
            reason: format!("expected the integer {SCHEMA_VERSION}, found {other}"),
        }),
    }
}

impl SpendRecord {
    /// Parses and validates one line (without its trailing newline).
    pub fn parse_line(line: &[u8]) -> Result<Self, RecordError> {
        let text = std::str::from_utf8(line).map_err(|e| RecordError::NotUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return Err(RecordError::Empty);
        }
        // One parse on the common path. Only when it fails, or reads another schema, is `schema`
        // looked at on its own: a record from a newer writer gets the clear "upgrade" message
        // instead of whatever field error its new shape would trigger.
        // A line as the proxy writes it is read by `scan`; anything else by serde.
        let record =
            match scan::parse(text).map_or_else(|| serde_json::from_str::<SpendRecord>(text), Ok) {
                Ok(r) if r.schema == SCHEMA_VERSION => r,
                Ok(r) => {
                    return Err(RecordError::UnsupportedSchema {
                        found: u64::from(r.schema),
                    });
                }
                Err(e) => {
                    check_schema(text)?;
                    // Parse again, slowly, only to name the field that is wrong.
                    return Err(RecordError::Json(describe_json_error(text, e)));
                }
            };
        record.validate()?;
        Ok(record)
    }

    /// Checks the invariants serde cannot express.
    pub fn validate(&self) -> Result<(), RecordError> {
        let field = |field: &'static str, reason: String| RecordError::Field { field, reason };
        if self.transaction_id.is_empty() {
            return Err(field("transaction_id", "must not be empty".into()));
        }
        if self.transaction_id.len() > MAX_TRANSACTION_ID_LEN {
            return Err(field(
                "transaction_id",
                format!(
                    "is {} bytes long; at most {MAX_TRANSACTION_ID_LEN} are accepted",
                    self.transaction_id.len()
                ),
            ));
        }
        if self.transaction_id.chars().any(char::is_control) {
            return Err(field(
                "transaction_id",
                "contains control characters".into(),
            ));
        }
        if self.model.is_empty() {
            return Err(field("model", "must not be empty".into()));
        }
        for (name, value) in [
            ("input_tokens", Some(self.input_tokens)),
            ("output_tokens", Some(self.output_tokens)),
            ("total_tokens", self.total_tokens),
            (
                "cache_read_input_tokens",
                Some(self.cache_read_input_tokens),
            ),
            (
                "cache_creation_input_tokens",
                Some(self.cache_creation_input_tokens),
            ),
            ("reasoning_tokens", Some(self.reasoning_tokens)),
        ] {
            if let Some(v) = value
                && v > MAX_TOKENS
            {
                return Err(field(
                    name,
                    format!(
                        "{v} is implausibly large (limit {MAX_TOKENS}); the record looks corrupt"
                    ),
                ));
            }
        }
        if let Some(cost) = self.response_cost {
            if !cost.is_finite() {
                return Err(field(
                    "response_cost",
                    format!("{cost} is not a finite number"),
                ));
            }
            if cost < 0.0 {
                return Err(field("response_cost", format!("{cost} is negative")));
            }
            if cost > MAX_COST_USD {
                return Err(field(
                    "response_cost",
                    format!("{cost} USD for one call is implausible (limit {MAX_COST_USD})"),
                ));
            }
        }
        if let (Some(start), end) = (self.start_time, self.end_time)
            && start > end
        {
            return Err(field(
                "start_time",
                format!(
                    "{} is after end_time {}",
                    fmt_millis(&start),
                    fmt_millis(&end)
                ),
            ));
        }
        Ok(())
    }

    /// Only successful calls are billed; failures are logged for observability.
    pub fn is_billable(&self) -> bool {
        self.status == Status::Success
    }

    /// `total_tokens` as reported, or input + output when the writer left it out.
    pub fn total_tokens(&self) -> u64 {
        self.total_tokens
            .unwrap_or(self.input_tokens.saturating_add(self.output_tokens))
    }

    /// The record as one spend-log line, including the trailing `\n`.
    pub fn to_line(&self) -> Vec<u8> {
        // Written field by field, byte for byte what `serde_json::to_writer(self)` writes (a test
        // holds the two equal): the proxy writes one per request, and the derived form spent
        // most of its time escaping the constant field names.
        let mut w = Line(Vec::with_capacity(640));
        w.raw("{\"schema\":");
        w.uint(u64::from(self.schema));
        w.raw(",\"transaction_id\":");
        w.str(&self.transaction_id);
        w.raw(",\"start_time\":");
        match &self.start_time {
            Some(t) => w.str(&fmt_millis(t)),
            None => w.raw("null"),
        }
        w.raw(",\"end_time\":");
        w.str(&fmt_millis(&self.end_time));
        w.raw(",\"call_type\":");
        w.str(&self.call_type);
        w.raw(",\"model\":");
        w.str(&self.model);
        w.raw(",\"upstream_model\":");
        w.opt_str(self.upstream_model.as_deref());
        w.raw(",\"input_tokens\":");
        w.uint(self.input_tokens);
        w.raw(",\"output_tokens\":");
        w.uint(self.output_tokens);
        w.raw(",\"total_tokens\":");
        w.opt_uint(self.total_tokens);
        w.raw(",\"cache_read_input_tokens\":");
        w.uint(self.cache_read_input_tokens);
        w.raw(",\"cache_creation_input_tokens\":");
        w.uint(self.cache_creation_input_tokens);
        w.raw(",\"reasoning_tokens\":");
        w.uint(self.reasoning_tokens);
        w.raw(",\"usage_estimated\":");
        w.bool(self.usage_estimated);
        w.raw(",\"response_cost\":");
        match self.response_cost {
            // serde_json's float format (and `null` for a non-finite one).
            Some(cost) => w.json(&cost),
            None => w.raw("null"),
        }
        w.raw(",\"end_user_id\":");
        w.opt_str(self.end_user_id.as_deref());
        w.raw(",\"user_id\":");
        w.opt_str(self.user_id.as_deref());
        w.raw(",\"team_id\":");
        w.opt_str(self.team_id.as_deref());
        w.raw(",\"key_alias\":");
        w.opt_str(self.key_alias.as_deref());
        w.raw(",\"key_hash\":");
        w.opt_str(self.key_hash.as_deref());
        w.raw(",\"stream\":");
        w.bool(self.stream);
        w.raw(",\"status\":");
        w.str(self.status.as_str());
        w.raw(",\"duration_ms\":");
        w.opt_uint(self.duration_ms);
        w.raw("}\n");
        w.0
    }
}

/// A spend-log line being written, in serde_json's formats.
struct Line(Vec<u8>);

impl Line {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn uint(&mut self, n: u64) {
        self.raw(itoa::Buffer::new().format(n));
    }

    fn opt_uint(&mut self, n: Option<u64>) {
        match n {
            Some(n) => self.uint(n),
            None => self.raw("null"),
        }
    }

    fn bool(&mut self, b: bool) {
        self.raw(if b { "true" } else { "false" });
    }

    fn str(&mut self, s: &str) {
        // Most values (ids, model names, timestamps) need no escaping: copy them as they are.
        // A fold without an early exit: no branch per byte.
        let plain = !s.bytes().fold(false, |any, b| {
            any | (b < 0x20) | (b == b'"') | (b == b'\\')
        });
        if plain {
            self.0.push(b'"');
            self.raw(s);
            self.0.push(b'"');
        } else {
            self.json(s);
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.raw("null"),
        }
    }

    /// Anything else through serde_json itself (a string or a float cannot fail to serialize
    /// into a Vec).
    fn json<T: Serialize + ?Sized>(&mut self, value: &T) {
        let _ = serde_json::to_writer(&mut self.0, value);
    }
}

/// serde_json's own message omits the field for type errors ("expected u64 at column 131");
/// serde_path_to_error adds it ("input_tokens: invalid value: integer `-1`, expected u64").
fn describe_json_error(text: &str, plain: serde_json::Error) -> String {
    let de = &mut serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, SpendRecord>(de) {
        Err(e) if !e.path().to_string().is_empty() && e.path().to_string() != "." => {
            format!("field `{}`: {}", e.path(), e.inner())
        }
        _ => plain.to_string(),
    }
}

/// RFC 3339, UTC, milliseconds: the one timestamp format the spend log uses.
pub fn fmt_millis(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A spend-log timestamp: RFC 3339, any offset, read as UTC.
fn parse_time(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

fn parse_rfc3339<'de, D: Deserializer<'de>>(s: &str) -> Result<DateTime<Utc>, D::Error> {
    parse_time(s).map_err(|e| {
        serde::de::Error::custom(format!(
            "timestamp {s:?} is not RFC 3339 ({e}); expected e.g. 2026-11-27T10:00:00.123Z"
        ))
    })
}

mod millis {
    use super::*;
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&fmt_millis(t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        parse_rfc3339::<D>(&s)
    }
}

mod opt_millis {
    use super::*;
    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&fmt_millis(t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<std::borrow::Cow<str>>::deserialize(d)? {
            Some(s) => parse_rfc3339::<D>(&s).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> SpendRecord {
        SpendRecord {
            schema: 1,
            transaction_id: "0193a1b2-0000-7000-8000-000000000001".into(),
            start_time: Some("2026-11-27T10:00:00.000Z".parse().unwrap()),
            end_time: "2026-11-27T10:00:00.250Z".parse().unwrap(),
            call_type: "chat_completion".into(),
            model: "gpt-4o".into(),
            upstream_model: Some("gpt-4o-2024-08-06".into()),
            input_tokens: 7,
            output_tokens: 15,
            total_tokens: Some(22),
            cache_read_input_tokens: 0,
            cache_creation_input_tokens: 0,
            reasoning_tokens: 0,
            usage_estimated: false,
            response_cost: Some(0.0001675),
            end_user_id: Some("customer-1".into()),
            user_id: None,
            team_id: Some("team-a".into()),
            key_alias: Some("team-a-key".into()),
            key_hash: Some("ab".repeat(32)),
            stream: false,
            status: Status::Success,
            duration_ms: Some(250),
        }
    }

    fn parse(s: &str) -> Result<SpendRecord, RecordError> {
        SpendRecord::parse_line(s.as_bytes())
    }

    fn with(field: &str, value: serde_json::Value) -> String {
        let mut v = serde_json::to_value(sample()).unwrap();
        v[field] = value;
        v.to_string()
    }

    #[test]
    fn the_line_is_byte_for_byte_what_serde_json_writes() {
        // A small deterministic generator (SplitMix64) over values that stress each format.
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let strings = [
            "",
            "gpt-4o",
            "quote\"d",
            "back\\slash",
            "new\nline",
            "tab\t",
            "\u{1}\u{1f}",
            "del\u{7f}",
            "é",
            "🙂",
            "line\u{2028}sep",
            "</script>",
            "a/b",
        ];
        let floats = [
            0.0,
            -0.0,
            1e-7,
            0.0001675,
            0.1 + 0.2,
            1e21,
            123456.789,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::NAN,
            f64::INFINITY,
        ];
        let uints = [0, 1, 22, 999_999_999, u64::MAX];
        for _ in 0..2_000 {
            let mut pick = |n: usize| (next() % n as u64) as usize;
            let s = |i: usize| strings[i].to_owned();
            let opt = |i: usize, some: bool| some.then(|| strings[i].to_owned());
            let record = SpendRecord {
                schema: [1, 0, u32::MAX][pick(3)],
                transaction_id: s(pick(strings.len())),
                start_time: (pick(2) == 0).then(Utc::now),
                end_time: DateTime::from_timestamp_millis(pick(4_000_000_000_000) as i64)
                    .unwrap_or_default(),
                call_type: s(pick(strings.len())),
                model: s(pick(strings.len())),
                upstream_model: opt(pick(strings.len()), pick(2) == 0),
                input_tokens: uints[pick(uints.len())],
                output_tokens: uints[pick(uints.len())],
                total_tokens: (pick(2) == 0).then(|| uints[pick(uints.len())]),
                cache_read_input_tokens: uints[pick(uints.len())],
                cache_creation_input_tokens: uints[pick(uints.len())],
                reasoning_tokens: uints[pick(uints.len())],
                usage_estimated: pick(2) == 0,
                response_cost: (pick(3) != 0).then(|| floats[pick(floats.len())]),
                end_user_id: opt(pick(strings.len()), pick(2) == 0),
                user_id: opt(pick(strings.len()), pick(2) == 0),
                team_id: opt(pick(strings.len()), pick(2) == 0),
                key_alias: opt(pick(strings.len()), pick(2) == 0),
                key_hash: opt(pick(strings.len()), pick(2) == 0),
                stream: pick(2) == 0,
                status: Status::from(s(pick(strings.len()))),
                duration_ms: (pick(2) == 0).then(|| uints[pick(uints.len())]),
            };
            let mut expected = serde_json::to_vec(&record).unwrap();
            expected.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(&record.to_line()),
                String::from_utf8_lossy(&expected)
            );
        }
    }

    #[test]
    fn round_trips_through_a_line() {
        let line = sample().to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back = SpendRecord::parse_line(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn writes_millisecond_utc_timestamps_and_nulls_for_unknowns() {
        let v: serde_json::Value = serde_json::from_slice(&sample().to_line()).unwrap();
        assert_eq!(v["end_time"], "2026-11-27T10:00:00.250Z");
        assert!(v["user_id"].is_null());
        assert_eq!(v["schema"], 1);
    }

    #[test]
    fn accepts_unknown_fields_and_other_offsets() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["some_future_field"] = serde_json::json!({"x": 1});
        v["end_time"] = "2026-11-27T11:00:00.250+01:00".into();
        let r = parse(&v.to_string()).unwrap();
        assert_eq!(fmt_millis(&r.end_time), "2026-11-27T10:00:00.250Z");
    }

    #[test]
    fn rejects_a_newer_schema_with_an_upgrade_hint() {
        let err = parse(&with("schema", 2.into())).unwrap_err();
        assert_eq!(err, RecordError::UnsupportedSchema { found: 2 });
        assert!(err.to_string().contains("upgrade tally"));
        // A newer record whose shape changed too: the schema is still what is named.
        let mut v = serde_json::to_value(sample()).unwrap();
        v["schema"] = 7.into();
        v.as_object_mut().unwrap().remove("model");
        v["input_tokens"] = "many".into();
        assert_eq!(
            parse(&v.to_string()).unwrap_err(),
            RecordError::UnsupportedSchema { found: 7 }
        );
        // A missing or malformed schema is named before the other fields' errors.
        v.as_object_mut().unwrap().remove("schema");
        assert_eq!(
            parse(&v.to_string()).unwrap_err(),
            RecordError::Json("missing field `schema`".into())
        );
        v["schema"] = "1".into();
        assert!(matches!(
            parse(&v.to_string()).unwrap_err(),
            RecordError::Field {
                field: "schema",
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_values_naming_the_field() {
        let cases = [
            ("input_tokens", serde_json::json!(-1), "input_tokens"),
            (
                "output_tokens",
                serde_json::json!(5_000_000_000u64),
                "output_tokens",
            ),
            ("response_cost", serde_json::json!(-0.5), "response_cost"),
            ("response_cost", serde_json::json!("free"), "response_cost"),
            ("transaction_id", serde_json::json!(""), "transaction_id"),
            ("end_time", serde_json::json!("yesterday"), "RFC 3339"),
            ("end_time", serde_json::json!(1732700000), "end_time"),
        ];
        for (field, value, expect) in cases {
            let err = parse(&with(field, value.clone())).unwrap_err().to_string();
            assert!(err.contains(expect), "{field}={value}: {err}");
        }
    }

    #[test]
    fn rejects_missing_required_fields() {
        for field in [
            "transaction_id",
            "end_time",
            "model",
            "input_tokens",
            "status",
        ] {
            let mut v = serde_json::to_value(sample()).unwrap();
            v.as_object_mut().unwrap().remove(field);
            let err = parse(&v.to_string()).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn rejects_infinite_cost_and_garbage() {
        assert!(parse(&with("response_cost", serde_json::json!(1e300))).is_err());
        assert!(parse(r#"{"schema":1,"response_cost":1e999}"#).is_err());
        assert!(matches!(parse("{not json"), Err(RecordError::Json(_))));
        assert_eq!(parse("   "), Err(RecordError::Empty));
        assert!(matches!(
            SpendRecord::parse_line(b"{\"schema\":1,\xff}"),
            Err(RecordError::NotUtf8 { valid_up_to: 12 })
        ));
    }

    #[test]
    fn records_without_the_token_classes_read_them_as_zero() {
        let line = br#"{"schema":1,"transaction_id":"t","end_time":"2026-11-27T10:00:00.250Z","model":"m","input_tokens":7,"output_tokens":15,"status":"success"}"#;
        let r = SpendRecord::parse_line(line).unwrap();
        assert_eq!(
            (
                r.cache_read_input_tokens,
                r.cache_creation_input_tokens,
                r.reasoning_tokens
            ),
            (0, 0, 0)
        );
        let err = parse(&with(
            "reasoning_tokens",
            serde_json::json!(5_000_000_000u64),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("reasoning_tokens"), "{err}");
    }

    #[test]
    fn only_success_is_billable_and_total_falls_back() {
        let mut r = sample();
        assert!(r.is_billable());
        r.total_tokens = None;
        assert_eq!(r.total_tokens(), 22);
        r.status = Status::Failure;
        assert!(!r.is_billable());
        r.status = Status::Other("Success".into());
        assert!(!r.is_billable());
    }

    #[test]
    fn every_status_word_reads_and_writes_back_as_it_was() {
        for (word, status) in [
            ("success", Status::Success),
            ("failure", Status::Failure),
            ("timeout", Status::Other("timeout".into())),
            ("", Status::Other(String::new())),
            ("quote\"d", Status::Other("quote\"d".into())),
        ] {
            let line = with("status", word.into());
            let r = parse(&line).unwrap();
            assert_eq!(r.status, status, "{word}");
            assert_eq!(r.status.as_str(), word);
            let written: serde_json::Value = serde_json::from_slice(&r.to_line()).unwrap();
            assert_eq!(written["status"], word);
        }
        // An escaped word in the line is read as the word it stands for.
        let escaped =
            with("status", "x".into()).replace("\"status\":\"x\"", "\"status\":\"succ\\u0065ss\"");
        assert_eq!(parse(&escaped).unwrap().status, Status::Success);
    }
}
