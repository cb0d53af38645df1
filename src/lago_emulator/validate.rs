//! Turns one JSON event from a request body into the fields Lago keeps, or the per-field
//! errors Lago answers with (`{"timestamp":["invalid_format"]}`, `value_is_mandatory`, ...).
//!
//! Lago's controller permits a fixed list of scalar fields (Rails strong parameters), so
//! anything else — `external_customer_id` included — is dropped without a word, and a field
//! given as an object or array where a scalar is expected is as good as absent.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// An event that passed validation, in the compact form the store keeps.
#[derive(Debug, Clone)]
pub(crate) struct ParsedEvent {
    pub transaction_id: Box<str>,
    pub external_subscription_id: Option<Box<str>>,
    pub code: Box<str>,
    pub timestamp_millis: i64,
    pub precise_total_amount_cents: Option<Box<str>>,
    /// `properties` re-serialized compactly: kept as text because nothing reads it on the hot path.
    pub properties_json: Box<str>,
}

/// Per-field error codes for one event, in the order Lago reports them.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct FieldErrors(pub Vec<(&'static str, &'static str)>);

impl FieldErrors {
    pub fn push(&mut self, field: &'static str, code: &'static str) {
        self.0.push((field, code));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `{"field":["code", ...], ...}` as Lago writes `error_details`.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        for (field, code) in &self.0 {
            let entry = out
                .entry(field.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(codes) = entry {
                codes.push(Value::String((*code).to_string()));
            }
        }
        Value::Object(out)
    }
}

/// The fields of an event that Lago permits, in [`Fields`] order; the rest are dropped.
const PERMITTED: [&str; 6] = [
    "transaction_id",
    "code",
    "timestamp",
    "precise_total_amount_cents",
    "external_subscription_id",
    "properties",
];

/// One event's permitted fields as sent (absent: `None`); `properties` as compact JSON text,
/// only when it is an object.
#[derive(Default)]
struct Fields<'a> {
    transaction_id: Option<Cow<'a, Value>>,
    code: Option<Cow<'a, Value>>,
    timestamp: Option<Cow<'a, Value>>,
    precise_total_amount_cents: Option<Cow<'a, Value>>,
    external_subscription_id: Option<Cow<'a, Value>>,
    properties: Option<Cow<'a, str>>,
}

impl<'a> Fields<'a> {
    fn of_value(event: &'a Value) -> Self {
        // A non-object array element has no permitted fields at all.
        let Some(object) = event.as_object() else {
            return Self::default();
        };
        let get = |name: &str| object.get(name).map(Cow::Borrowed);
        Fields {
            transaction_id: get("transaction_id"),
            code: get("code"),
            timestamp: get("timestamp"),
            precise_total_amount_cents: get("precise_total_amount_cents"),
            external_subscription_id: get("external_subscription_id"),
            properties: match object.get("properties") {
                Some(props @ Value::Object(_)) => Some(Cow::Owned(props.to_string())),
                _ => None,
            },
        }
    }

    /// From the event's JSON text, without building the whole tree: only the permitted scalars
    /// become values, and `properties` is kept as the text it came as when already compact.
    fn of_raw(event: &'a RawValue) -> Self {
        let Ok(Some(
            [
                transaction_id,
                code,
                timestamp,
                amount,
                subscription,
                properties,
            ],
        )) = object_fields(event.get().as_bytes(), &PERMITTED)
        else {
            return Self::default();
        };
        let value = |raw: Option<&RawValue>| {
            serde_json::from_str::<Value>(raw?.get())
                .ok()
                .map(Cow::Owned)
        };
        Fields {
            transaction_id: value(transaction_id),
            code: value(code),
            timestamp: value(timestamp),
            precise_total_amount_cents: value(amount),
            external_subscription_id: value(subscription),
            properties: properties.and_then(|raw| {
                let text = raw.get();
                if !text.starts_with('{') {
                    None
                } else if is_compact(text) {
                    Some(Cow::Borrowed(text))
                } else {
                    let props = serde_json::from_str::<Map<String, Value>>(text).ok()?;
                    Some(Cow::Owned(Value::Object(props).to_string()))
                }
            }),
        }
    }
}

/// Validates one event. `now_millis` is the time of receipt, used when `timestamp` is absent.
pub(crate) fn parse_event(event: &Value, now_millis: i64) -> Result<ParsedEvent, FieldErrors> {
    validate(Fields::of_value(event), now_millis)
}

/// [`parse_event`] of an event still in its request's JSON text (the batch endpoint's path:
/// a hundred events a request, each with a dozen properties, are not built into a tree).
pub(crate) fn parse_raw_event(
    event: &RawValue,
    now_millis: i64,
) -> Result<ParsedEvent, FieldErrors> {
    validate(Fields::of_raw(event), now_millis)
}

fn validate(fields: Fields<'_>, now_millis: i64) -> Result<ParsedEvent, FieldErrors> {
    let mut errors = FieldErrors::default();

    let transaction_id = present_scalar(fields.transaction_id.as_deref());
    if transaction_id.is_none() {
        errors.push("transaction_id", "value_is_mandatory");
    }
    let code = present_scalar(fields.code.as_deref());
    if code.is_none() {
        errors.push("code", "value_is_mandatory");
    }
    let timestamp_millis = match fields.timestamp.as_deref() {
        None | Some(Value::Null) => Some(now_millis),
        Some(value) => timestamp_millis(value),
    };
    if timestamp_millis.is_none() {
        errors.push("timestamp", "invalid_format");
    }
    let precise_total_amount_cents = match fields.precise_total_amount_cents.as_deref() {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(n.to_string().into_boxed_str())),
        Some(Value::String(s)) if is_decimal(s.trim()) => Ok(Some(s.trim().into())),
        Some(_) => Err(()),
    };
    if precise_total_amount_cents.is_err() {
        errors.push("precise_total_amount_cents", "invalid_format");
    }
    let external_subscription_id =
        scalar_string(fields.external_subscription_id.as_deref()).map(String::into_boxed_str);
    // Anything but an object is not a permitted `properties` value: Lago keeps `{}`.
    let properties_json: Box<str> = match fields.properties {
        Some(props) => props.into(),
        None => "{}".into(),
    };

    match (
        transaction_id,
        code,
        timestamp_millis,
        precise_total_amount_cents,
    ) {
        (Some(transaction_id), Some(code), Some(timestamp_millis), Ok(precise))
            if errors.is_empty() =>
        {
            Ok(ParsedEvent {
                transaction_id: transaction_id.into_boxed_str(),
                external_subscription_id,
                code: code.into_boxed_str(),
                timestamp_millis,
                precise_total_amount_cents: precise,
                properties_json,
            })
        }
        _ => Err(errors),
    }
}

/// The values of the `names` members of a JSON object, as their text (the last one wins when a
/// name repeats, as Rails parses it); `Ok(None)` for valid JSON that is not an object. The whole
/// text is checked, so `Err` means it is not JSON.
pub(crate) fn object_fields<'a, const N: usize>(
    json: &'a [u8],
    names: &[&'static str; N],
) -> Result<Option<[Option<&'a RawValue>; N]>, serde_json::Error> {
    if json.trim_ascii_start().first() != Some(&b'{') {
        serde_json::from_slice::<IgnoredAny>(json)?;
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let fields = de.deserialize_map(ObjectFields(names))?;
    de.end()?;
    Ok(Some(fields))
}

struct ObjectFields<'n, const N: usize>(&'n [&'static str; N]);

impl<'de, const N: usize> Visitor<'de> for ObjectFields<'_, N> {
    type Value = [Option<&'de RawValue>; N];

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = [None; N];
        while let Some(key) = map.next_key_seed(NameIn(self.0))? {
            match key {
                Some(i) => out[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// A member name → its place in the names looked for (no allocation, escaped names included).
struct NameIn<'n, const N: usize>(&'n [&'static str; N]);

impl<'de, const N: usize> DeserializeSeed<'de> for NameIn<'_, N> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for NameIn<'_, N> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|n| *n == name))
    }
}

/// No whitespace outside strings: the text is already what re-serializing would give, apart
/// from the order and repetition of keys, which every reader resolves the same way.
fn is_compact(json: &str) -> bool {
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if b.is_ascii_whitespace() {
            return false;
        }
    }
    true
}

/// A permitted scalar as the string Rails would store; objects and arrays are not permitted.
fn scalar_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Like [`scalar_string`], but a blank string fails Lago's presence check too.
fn present_scalar(value: Option<&Value>) -> Option<String> {
    scalar_string(value).filter(|s| !s.trim().is_empty())
}

/// Unix seconds (integer, float or numeric string) → milliseconds, truncated as Lago's
/// millisecond column does. `None` means `invalid_format` (ISO strings, garbage, out of range).
pub(crate) fn timestamp_millis(value: &Value) -> Option<i64> {
    let millis = match value {
        Value::Number(n) => {
            if let Some(secs) = n.as_i64() {
                secs.checked_mul(1000)?
            } else {
                // Rust prints an f64 as its shortest round-trip decimal, never in exponent form,
                // so 1651240791.123 stays .123 instead of becoming .122999...
                decimal_seconds_to_millis(&n.as_f64()?.to_string())?
            }
        }
        Value::String(s) => {
            let s = s.trim();
            if s.contains(['e', 'E']) {
                let secs: f64 = s.parse().ok()?;
                if !secs.is_finite() {
                    return None;
                }
                decimal_seconds_to_millis(&secs.to_string())?
            } else {
                decimal_seconds_to_millis(s)?
            }
        }
        _ => return None,
    };
    // Beyond what a timestamp column (and chrono) can represent: Lago would fail to store it.
    chrono::DateTime::from_timestamp_millis(millis)?;
    Some(millis)
}

/// `[-+]digits[.digits]` or `[-+].digits` → milliseconds, rounding toward the past.
fn decimal_seconds_to_millis(s: &str) -> Option<i64> {
    let (negative, unsigned) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int_part, frac_part) = match unsigned.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (unsigned, None),
    };
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if !digits(int_part) || (int_part.is_empty() && frac_part.is_none_or(str::is_empty)) {
        return None;
    }
    if let Some(f) = frac_part
        && (f.is_empty() || !digits(f))
    {
        return None;
    }
    let secs: i64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    let frac = frac_part.unwrap_or("");
    let mut ms: i64 = 0;
    for i in 0..3 {
        ms = ms * 10 + frac.as_bytes().get(i).map_or(0, |b| i64::from(b - b'0'));
    }
    let rest_nonzero = frac.bytes().skip(3).any(|b| b != b'0');
    let magnitude = secs.checked_mul(1000)?.checked_add(ms)?;
    if negative {
        magnitude
            .checked_neg()?
            .checked_sub(i64::from(rest_nonzero))
    } else {
        Some(magnitude)
    }
}

fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.parse::<f64>().is_ok_and(f64::is_finite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_in_seconds_keep_milliseconds() {
        assert_eq!(
            timestamp_millis(&json!(1651240791)),
            Some(1_651_240_791_000)
        );
        assert_eq!(
            timestamp_millis(&json!(1651240791.123)),
            Some(1_651_240_791_123)
        );
        assert_eq!(
            timestamp_millis(&json!("1651240791.123")),
            Some(1_651_240_791_123)
        );
        assert_eq!(
            timestamp_millis(&json!("1651240791.1239")),
            Some(1_651_240_791_123)
        );
        assert_eq!(
            timestamp_millis(&json!("1651240791")),
            Some(1_651_240_791_000)
        );
        assert_eq!(timestamp_millis(&json!("1.6e9")), Some(1_600_000_000_000));
        assert_eq!(timestamp_millis(&json!(".5")), Some(500));
        assert_eq!(timestamp_millis(&json!("-1.5001")), Some(-1501));
    }

    #[test]
    fn non_numeric_timestamps_are_invalid() {
        for bad in [
            json!("2022-04-29T08:59:51Z"),
            json!(""),
            json!("12a"),
            json!("1."),
            json!("."),
            json!(true),
            json!([1]),
            json!({"s": 1}),
            json!(i64::MAX),
        ] {
            assert_eq!(timestamp_millis(&bad), None, "{bad}");
        }
    }

    #[test]
    fn milliseconds_since_epoch_land_in_the_future() {
        let ms = timestamp_millis(&json!(1_651_240_791_123_i64)).unwrap();
        assert_eq!(ms, 1_651_240_791_123_000);
    }

    #[test]
    fn missing_fields_are_reported_together() {
        let err = parse_event(&json!({"timestamp": "2022-01-01"}), 0).unwrap_err();
        assert_eq!(
            err.to_json(),
            json!({"transaction_id": ["value_is_mandatory"], "code": ["value_is_mandatory"],
                   "timestamp": ["invalid_format"]})
        );
        let err = parse_event(&json!({"transaction_id": "  ", "code": {"x": 1}}), 0).unwrap_err();
        assert_eq!(
            err.to_json(),
            json!({"transaction_id": ["value_is_mandatory"], "code": ["value_is_mandatory"]})
        );
    }

    #[test]
    fn the_raw_path_reads_every_event_as_the_tree_path_does() {
        let cases = [
            r#"{"transaction_id":"t","code":"c","timestamp":1651240791.123,"properties":{"b":2,"a":{"x":[1,"y"]}},"precise_total_amount_cents":"12.5","external_subscription_id":"s"}"#,
            r#"{"transaction_id":42,"code":"c","properties": { "a" : 1 } ,"external_customer_id":"x"}"#,
            r#"{"transaction_id":"a","transaction_id":"b","code":"c","code":"d"}"#,
            r#"{"transaction_\u0069d":"escaped name","code":"c"}"#,
            r#"{"transaction_id":"t","code":"c","properties":{"s":"a \" b\\","k":"two words"}}"#,
            r#"{"transaction_id":"  ","code":{"x":1},"timestamp":"2022-01-01"}"#,
            r#"{"transaction_id":"t","code":"c","timestamp":null,"precise_total_amount_cents":true,"properties":[1]}"#,
            r#"{"transaction_id":true,"code":1.5,"timestamp":"1.6e9","external_subscription_id":7}"#,
            r#"[1,2]"#,
            r#""a string""#,
            r#"null"#,
            r#"{}"#,
        ];
        for case in cases {
            let tree = parse_event(&serde_json::from_str(case).unwrap(), 5);
            let raw = parse_raw_event(&serde_json::from_str::<Box<RawValue>>(case).unwrap(), 5);
            match (tree, raw) {
                (Ok(t), Ok(r)) => {
                    let props = |e: &ParsedEvent| {
                        serde_json::from_str::<Value>(&e.properties_json).unwrap()
                    };
                    assert_eq!(props(&t), props(&r), "{case}");
                    assert_eq!(
                        format!(
                            "{:?}",
                            ParsedEvent {
                                properties_json: "".into(),
                                ..t
                            }
                        ),
                        format!(
                            "{:?}",
                            ParsedEvent {
                                properties_json: "".into(),
                                ..r
                            }
                        ),
                        "{case}"
                    );
                }
                (Err(t), Err(r)) => assert_eq!(t, r, "{case}"),
                (t, r) => panic!("{case}: tree {t:?}, raw {r:?}"),
            }
        }
        // Compact properties are kept as sent; spaced ones are written compactly.
        let raw = |s: &str| serde_json::from_str::<Box<RawValue>>(s).unwrap();
        let kept = parse_raw_event(&raw(cases[4]), 0).unwrap();
        assert_eq!(
            &*kept.properties_json,
            r#"{"s":"a \" b\\","k":"two words"}"#
        );
        let compacted = parse_raw_event(&raw(cases[1]), 0).unwrap();
        assert_eq!(&*compacted.properties_json, r#"{"a":1}"#);
    }

    #[test]
    fn object_fields_checks_the_whole_text() {
        let names = ["events"];
        assert!(object_fields(b"{\"events\":[1]", &names).is_err());
        assert!(object_fields(b"{\"events\":[1]} x", &names).is_err());
        assert!(object_fields(b"{\"other\":[1,}", &names).is_err());
        let not_an_object = object_fields(b" [1, {\"events\": 2}] ", &names).unwrap();
        assert!(not_an_object.is_none());
        let [events] = object_fields(b"{\"x\":{\"events\":0},\"events\":[1, 2]}", &names)
            .unwrap()
            .unwrap();
        assert_eq!(events.map(RawValue::get), Some("[1, 2]"));
    }

    #[test]
    fn kept_fields_and_defaults() {
        let event = parse_event(
            &json!({"transaction_id": 42, "code": "c", "external_customer_id": "x",
                    "properties": {"a": 1}, "precise_total_amount_cents": "12.5"}),
            7_000,
        )
        .unwrap();
        assert_eq!(&*event.transaction_id, "42");
        assert_eq!(event.timestamp_millis, 7_000);
        assert_eq!(event.external_subscription_id, None);
        assert_eq!(&*event.properties_json, r#"{"a":1}"#);
        assert_eq!(event.precise_total_amount_cents.as_deref(), Some("12.5"));
        let event = parse_event(
            &json!({"transaction_id": "t", "code": "c", "properties": [1]}),
            0,
        )
        .unwrap();
        assert_eq!(&*event.properties_json, "{}");
    }
}
