//! A relayed request's JSON body, read without building a `serde_json::Value` tree: the body is
//! checked to be JSON exactly as `Value` would accept it, its top-level members are located by
//! byte range, and the upstream's body is the client's with only the members the proxy changes
//! (`model`, `stream_options`) replaced. Every other member goes through byte for byte.
//!
//! Parsing into a `Value` allocated every string and map of the conversation and re-encoded all
//! of it per request, about a fifteenth of a proxied call's instructions.

use std::ops::Range;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::ProxyError;

/// A request body known to be a JSON object, with its top-level members located.
#[derive(Debug, Clone)]
pub struct JsonBody {
    bytes: Bytes,
    /// Top-level members in order: name and the value's byte range in `bytes`. A repeated name
    /// keeps its first position and its last value, as `Value` would keep it.
    members: Vec<(String, Range<usize>)>,
}

impl JsonBody {
    /// Checks `bytes` is a JSON object, refusing what `serde_json::Value` refuses with the same
    /// 400 (and message).
    pub fn parse(bytes: Bytes) -> Result<Self, ProxyError> {
        // Checked as text once: serde_json then skips checking each string's UTF-8 (a tenth of
        // the parse). Invalid UTF-8 falls through to `Value`'s error below.
        if let Ok(text) = std::str::from_utf8(&bytes)
            && serde_json::from_str::<Strict>(text).is_ok()
            && let Some(members) = locate_members(text)
        {
            return Ok(Self { bytes, members });
        }
        // Not a JSON object: `Value` says why, in the words clients already get.
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => {
                // Unreachable in practice (the checks above accept every object); handled by
                // re-encoding rather than refusing a valid request.
                let bytes =
                    Bytes::from(serde_json::to_vec(&map).map_err(|e| {
                        ProxyError::Internal(format!("re-encoding the request: {e}"))
                    })?);
                let members = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(locate_members)
                    .ok_or_else(|| {
                        ProxyError::Internal("a re-encoded request did not parse".into())
                    })?;
                Ok(Self { bytes, members })
            }
            Ok(_) => Err(ProxyError::bad_request(
                "the request body must be a JSON object",
            )),
            Err(e) => Err(ProxyError::bad_request(format!(
                "the request body is not valid JSON: {e}"
            ))),
        }
    }

    /// The raw JSON text of a top-level member's value.
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, range)| &self.bytes[range.clone()])
    }

    /// A top-level member's value, parsed (meant for small members).
    pub fn get(&self, name: &str) -> Option<Value> {
        // The whole body parsed as JSON, so each member's text does too.
        self.raw(name)
            .and_then(|raw| serde_json::from_slice(raw).ok())
    }

    /// The member's JSON type, without parsing its value.
    pub fn kind(&self, name: &str) -> Option<Kind> {
        let raw = self.raw(name)?;
        Some(match raw.first() {
            Some(b'[') => Kind::Array,
            Some(b'{') => Kind::Object,
            Some(b'"') => Kind::String,
            Some(b'n') => Kind::Null,
            Some(b't' | b'f') => Kind::Bool,
            _ => Kind::Number,
        })
    }

    /// The whole body as a map (the mock answers and the usage estimate, both rare paths).
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::from_slice(&self.bytes) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    /// The body with the named members' values replaced (and appended when absent): the
    /// client's bytes otherwise. `replacements` hold JSON texts.
    pub fn with_members(&self, replacements: &[(&str, &[u8])]) -> Vec<u8> {
        let extra: usize = replacements
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum();
        let mut out = Vec::with_capacity(self.bytes.len() + extra);
        out.push(b'{');
        let mut first = true;
        let mut separator = |out: &mut Vec<u8>| {
            if !first {
                out.push(b',');
            }
            first = false;
        };
        for (name, range) in &self.members {
            separator(&mut out);
            write_name(&mut out, name);
            match replacements.iter().find(|(n, _)| n == name) {
                Some((_, value)) => out.extend_from_slice(value),
                None => out.extend_from_slice(&self.bytes[range.clone()]),
            }
        }
        for (name, value) in replacements {
            if !self.members.iter().any(|(n, _)| n == name) {
                separator(&mut out);
                write_name(&mut out, name);
                out.extend_from_slice(value);
            }
        }
        out.push(b'}');
        out
    }

    /// The client's body as received.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// A JSON value's type, read from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

fn write_name(out: &mut Vec<u8>, name: &str) {
    // Writing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, name);
    out.push(b':');
}

/// The top-level members and their value ranges, or `None` when the body is not an object.
fn locate_members(text: &str) -> Option<Vec<(String, Range<usize>)>> {
    let bytes = text.as_bytes();
    let Members(found) = serde_json::from_str::<Members>(text).ok()?;
    let base = bytes.as_ptr() as usize;
    let mut members: Vec<(String, Range<usize>)> = Vec::with_capacity(found.len());
    for (name, raw) in found {
        let text = raw.get();
        let start = (text.as_ptr() as usize).checked_sub(base)?;
        let range = start..start + text.len();
        if bytes.get(range.clone())? != text.as_bytes() {
            return None;
        }
        match members.iter_mut().find(|(n, _)| *n == name) {
            Some(member) => member.1 = range,
            None => members.push((name, range)),
        }
    }
    Some(members)
}

/// Top-level members of an object, each value borrowed from the input.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(name) = map.next_key::<String>()? {
                    members.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Accepts exactly the JSON `Value` accepts (same nesting limit, number range, string checks),
/// allocating nothing for unescaped strings.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_borrowed_str<E: de::Error>(self, _: &'de str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_string<E: de::Error>(self, _: String) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_none<E: de::Error>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
        Strict::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        // Keys are strings, checked like values.
        while map.next_key::<Strict>()?.is_some() {
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<JsonBody, String> {
        JsonBody::parse(Bytes::from(text.to_owned())).map_err(|e| e.to_string())
    }

    /// The same acceptance and the same message as parsing into a `Value`.
    #[test]
    fn accepts_and_refuses_what_value_does() {
        let deep_ok = format!("{{\"a\":{}1{}}}", "[".repeat(126), "]".repeat(126));
        let deep_bad = format!("{{\"a\":{}1{}}}", "[".repeat(128), "]".repeat(128));
        let cases = [
            r#"{"model":"m","messages":[]}"#,
            r#"{"a":1e400}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\u00e9\n"}"#,
            "{\"a\":\"\x01\"}",
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            r#"[1,2]"#,
            r#""text""#,
            "",
            &deep_ok,
            &deep_bad,
            r#"{"a":-0.5e-3,"b":[true,false,null],"c":{"d":{}}}"#,
        ];
        for text in cases {
            let ours = parse(text).map(|b| b.to_map());
            let value = match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err("the request body must be a JSON object".to_owned()),
                Err(e) => Err(format!("the request body is not valid JSON: {e}")),
            };
            assert_eq!(ours, value, "{text:?}");
        }
    }

    /// Bodies that are not UTF-8 get `Value`'s message too.
    #[test]
    fn refuses_bytes_that_are_not_utf8_like_value_does() {
        let cases: [&[u8]; 4] = [
            b"{\"a\":\"\xff\"}",
            b"{\"a\":1}\xfe",
            b"{\"\xc3\x28\":1}",
            b"\xef\xbb\xbf{\"a\":1}",
        ];
        for bytes in cases {
            let ours = JsonBody::parse(Bytes::from_static(bytes)).map_err(|e| e.to_string());
            let value = serde_json::from_slice::<Value>(bytes)
                .map_err(|e| format!("the request body is not valid JSON: {e}"));
            assert!(value.is_err(), "{bytes:?}");
            assert_eq!(
                ours.map(|b| b.to_map()),
                value.map(|_| Map::new()),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn replaces_only_the_named_members_and_keeps_the_rest_byte_for_byte() {
        let text = r#"{ "model" : "alias", "temperature":0.70, "x":{"y":[1, 2]}, "stream":true }"#;
        let body = parse(text).unwrap();
        assert_eq!(body.raw("temperature"), Some(&b"0.70"[..]));
        assert_eq!(body.kind("x"), Some(Kind::Object));
        assert_eq!(body.get("stream"), Some(Value::Bool(true)));
        let out = body.with_members(&[
            ("model", br#""gpt-4o""#),
            ("stream_options", br#"{"include_usage":true}"#),
        ]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"gpt-4o","temperature":0.70,"x":{"y":[1, 2]},"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn a_repeated_member_keeps_its_last_value_like_value_does() {
        let body = parse(r#"{"model":"a","n":1,"model":"b","k\"ey":2}"#).unwrap();
        assert_eq!(body.get("model"), Some(Value::String("b".into())));
        let out = body.with_members(&[]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"b","n":1,"k\"ey":2}"#
        );
    }
}
