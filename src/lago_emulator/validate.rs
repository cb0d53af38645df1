//! Turns one JSON event from a request body into the fields Lago keeps, or the per-field
//! errors Lago answers with (`{"timestamp":["invalid_format"]}`, `value_is_mandatory`, ...).
//!
//! Lago's controller permits a fixed list of scalar fields (Rails strong parameters), so
//! anything else — `external_customer_id` included — is dropped without a word, and a field
//! given as an object or array where a scalar is expected is as good as absent.

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

/// Validates one event. `now_millis` is the time of receipt, used when `timestamp` is absent.
pub(crate) fn parse_event(event: &Value, now_millis: i64) -> Result<ParsedEvent, FieldErrors> {
    // A non-object array element has no permitted fields at all.
    let empty = Map::new();
    let fields = event.as_object().unwrap_or(&empty);
    let mut errors = FieldErrors::default();

    let transaction_id = present_scalar(fields.get("transaction_id"));
    if transaction_id.is_none() {
        errors.push("transaction_id", "value_is_mandatory");
    }
    let code = present_scalar(fields.get("code"));
    if code.is_none() {
        errors.push("code", "value_is_mandatory");
    }
    let timestamp_millis = match fields.get("timestamp") {
        None | Some(Value::Null) => Some(now_millis),
        Some(value) => timestamp_millis(value),
    };
    if timestamp_millis.is_none() {
        errors.push("timestamp", "invalid_format");
    }
    let precise_total_amount_cents = match fields.get("precise_total_amount_cents") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(n.to_string().into_boxed_str())),
        Some(Value::String(s)) if is_decimal(s.trim()) => Ok(Some(s.trim().into())),
        Some(_) => Err(()),
    };
    if precise_total_amount_cents.is_err() {
        errors.push("precise_total_amount_cents", "invalid_format");
    }
    let external_subscription_id =
        scalar_string(fields.get("external_subscription_id")).map(String::into_boxed_str);
    // Anything but an object is not a permitted `properties` value: Lago keeps `{}`.
    let properties_json: Box<str> = match fields.get("properties") {
        Some(props @ Value::Object(_)) => props.to_string().into_boxed_str(),
        _ => "{}".into(),
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
