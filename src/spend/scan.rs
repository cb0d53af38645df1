//! A reader for spend-log lines as tally's proxy writes them: one flat object, known fields,
//! strings without escapes. It reads such a line in about a third of serde's time (no per-field
//! visitor, a word-at-a-time string scan) and gives up on anything else, for serde to read and,
//! if need be, to explain.
//!
//! It may only ever answer what serde would: `Some(record)` means serde reads the same record from
//! the same text. So every doubt is a `None`: an unknown or repeated field, an escape or a control
//! character in a string, a number serde would refuse or read differently, anything after the
//! object. Floats and timestamps go through the same parsers as serde's path.

use chrono::{DateTime, Utc};

use super::{SCHEMA_VERSION, SpendRecord, Status};

/// The fields, in the order the proxy writes them ([`SpendRecord::to_line`]).
const FIELDS: [&str; 23] = [
    "schema",
    "transaction_id",
    "start_time",
    "end_time",
    "call_type",
    "model",
    "upstream_model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "response_cost",
    "end_user_id",
    "user_id",
    "team_id",
    "key_alias",
    "key_hash",
    "stream",
    "status",
    "duration_ms",
];

/// The fields serde requires, by their place in [`FIELDS`] (the others take its defaults).
const REQUIRED: u32 = 1 // schema
    | 1 << 1 // transaction_id
    | 1 << 3 // end_time
    | 1 << 5 // model
    | 1 << 7 // input_tokens
    | 1 << 8 // output_tokens
    | 1 << 21; // status

/// The place of `call_type` in [`FIELDS`]: serde's default stands in when it is absent.
const CALL_TYPE: usize = 4;

/// The record in `text`, or `None` when serde has to read it.
pub(super) fn parse(text: &str) -> Option<SpendRecord> {
    let mut s = Scan {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    // serde's defaults for the fields a line may leave out; the required ones are placeholders
    // until read (`REQUIRED`).
    let mut r = SpendRecord {
        schema: 0,
        transaction_id: String::new(),
        start_time: None,
        end_time: DateTime::UNIX_EPOCH,
        call_type: String::new(),
        model: String::new(),
        upstream_model: None,
        input_tokens: 0,
        output_tokens: 0,
        total_tokens: None,
        cache_read_input_tokens: 0,
        cache_creation_input_tokens: 0,
        reasoning_tokens: 0,
        usage_estimated: false,
        response_cost: None,
        end_user_id: None,
        user_id: None,
        team_id: None,
        key_alias: None,
        key_hash: None,
        stream: false,
        status: Status::Failure,
        duration_ms: None,
    };
    let mut seen: u32 = 0;
    // The field expected next, in the proxy's order: its key is matched in place.
    let mut next = 0;
    s.ws();
    s.byte(b'{')?;
    s.ws();
    if !s.eat(b'}') {
        loop {
            let field = match s.key_of(next) {
                Some(field) => field,
                None => {
                    let key = s.string()?;
                    s.ws();
                    s.byte(b':')?;
                    // serde skips a field it does not know; whatever it holds is left to serde.
                    FIELDS.iter().position(|&name| name == key)?
                }
            };
            s.ws();
            read(&mut r, field, &mut s)?;
            let bit = 1 << field;
            if seen & bit != 0 {
                return None; // serde: "duplicate field"
            }
            seen |= bit;
            next = field + 1;
            s.ws();
            if s.eat(b',') {
                s.ws();
                continue;
            }
            s.byte(b'}')?;
            break;
        }
    }
    s.ws();
    // Another schema gets serde's path and its "upgrade tally" message.
    if s.i != s.b.len() || seen & REQUIRED != REQUIRED || r.schema != SCHEMA_VERSION {
        return None;
    }
    if seen & 1 << CALL_TYPE == 0 {
        r.call_type = super::default_call_type();
    }
    Some(r)
}

/// Reads the value of field number `field` (of [`FIELDS`]) into `r`.
fn read(r: &mut SpendRecord, field: usize, s: &mut Scan<'_>) -> Option<()> {
    let text = |s: &mut Scan<'_>| s.string().map(str::to_owned);
    match field {
        0 => r.schema = u32::try_from(s.uint()?).ok()?,
        1 => r.transaction_id = text(s)?,
        2 => r.start_time = s.opt(Scan::time)?,
        3 => r.end_time = s.time()?,
        CALL_TYPE => r.call_type = text(s)?,
        5 => r.model = text(s)?,
        6 => r.upstream_model = s.opt(text)?,
        7 => r.input_tokens = s.uint()?,
        8 => r.output_tokens = s.uint()?,
        9 => r.total_tokens = s.opt(Scan::uint)?,
        10 => r.cache_read_input_tokens = s.uint()?,
        11 => r.cache_creation_input_tokens = s.uint()?,
        12 => r.reasoning_tokens = s.uint()?,
        13 => r.usage_estimated = s.bool()?,
        14 => r.response_cost = s.opt(Scan::float)?,
        15 => r.end_user_id = s.opt(text)?,
        16 => r.user_id = s.opt(text)?,
        17 => r.team_id = s.opt(text)?,
        18 => r.key_alias = s.opt(text)?,
        19 => r.key_hash = s.opt(text)?,
        20 => r.stream = s.bool()?,
        21 => r.status = Status::from(s.string()?),
        22 => r.duration_ms = s.opt(Scan::uint)?,
        _ => return None,
    }
    Some(())
}

struct Scan<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    /// JSON's whitespace, as serde skips it.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.b.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    fn byte(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    /// Field number `field`, when its key (with the colon) is what comes next.
    fn key_of(&mut self, field: usize) -> Option<usize> {
        let name = FIELDS.get(field)?.as_bytes();
        let rest = &self.b[self.i..];
        let end = name.len() + 2;
        let hit = rest.len() > end
            && rest[0] == b'"'
            && &rest[1..end - 1] == name
            && rest[end - 1] == b'"'
            && rest[end] == b':';
        if !hit {
            return None;
        }
        self.i += end + 1;
        Some(field)
    }

    fn word(&mut self, w: &[u8]) -> bool {
        let hit = self.b[self.i..].starts_with(w);
        if hit {
            self.i += w.len();
        }
        hit
    }

    /// `null` as `None`, else the value read by `read`.
    fn opt<T>(&mut self, read: fn(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.word(b"null") {
            return Some(None);
        }
        read(self).map(Some)
    }

    /// A string without escapes or control characters (those are serde's to read or refuse).
    fn string(&mut self) -> Option<&'a str> {
        self.byte(b'"')?;
        let start = self.i;
        let rest = &self.b[start..];
        let len = crate::text::json_plain_len(rest);
        if rest.get(len) != Some(&b'"') {
            return None;
        }
        self.i = start + len + 1;
        // Both ends are next to ASCII quotes: char boundaries of the text.
        self.text.get(start..start + len)
    }

    /// A JSON integer that fits a u64: `0` or digits without a leading zero (serde refuses a
    /// negative or an overflow for a u64; a fraction or an exponent after the digits is refused
    /// by the caller, which expects a `,` or a `}` there).
    fn uint(&mut self) -> Option<u64> {
        let start = self.i;
        let mut v: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.b.get(self.i) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        Some(v)
    }

    /// A number, read as an f64 by serde_json itself (the same rounding as serde's path).
    fn float(&mut self) -> Option<f64> {
        let start = self.i;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
        }
        serde_json::from_str(self.text.get(start..self.i)?).ok()
    }

    fn bool(&mut self) -> Option<bool> {
        if self.word(b"true") {
            Some(true)
        } else if self.word(b"false") {
            Some(false)
        } else {
            None
        }
    }

    /// A timestamp string: the proxy's own form read here, any other through the parser
    /// serde's path uses.
    fn time(&mut self) -> Option<DateTime<Utc>> {
        let text = self.string()?;
        millis_utc(text).or_else(|| super::parse_time(text).ok())
    }
}

/// `2026-11-27T10:00:00.250Z`, as [`super::fmt_millis`] writes it, and nothing else (a leap
/// second, another offset or precision, a lowercase letter: chrono reads those).
fn millis_utc(text: &str) -> Option<DateTime<Utc>> {
    let b: &[u8; 24] = text.as_bytes().try_into().ok()?;
    let shape_ok = b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z';
    if !shape_ok {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0u32, |v, &d| {
            d.is_ascii_digit().then(|| v * 10 + u32::from(d - b'0'))
        })
    };
    let (second, milli) = (num(17, 19)?, num(20, 23)?);
    if second > 59 {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(num(0, 4)? as i32, num(5, 7)?, num(8, 10)?)?;
    let time = date.and_hms_milli_opt(num(11, 13)?, num(14, 16)?, second, milli)?;
    Some(time.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde's reading of `text`, as `parse_line` does it without this module.
    fn by_serde(text: &str) -> Option<SpendRecord> {
        serde_json::from_str::<SpendRecord>(text).ok()
    }

    /// A line as the proxy writes it.
    fn canonical() -> String {
        let mut line = crate::spend::tests::sample().to_line();
        line.pop();
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn reads_the_proxys_lines_as_serde_does() {
        let line = canonical();
        let fast = parse(&line).expect("a canonical line takes the fast path");
        assert_eq!(Some(fast), by_serde(&line));
        // With the optional fields null or absent, and whitespace between the tokens.
        let mut record = crate::spend::tests::sample();
        record.start_time = None;
        record.upstream_model = None;
        record.total_tokens = None;
        record.response_cost = None;
        record.end_user_id = None;
        record.duration_ms = None;
        let mut line = String::from_utf8(record.to_line()).unwrap();
        line.pop();
        assert_eq!(parse(&line), Some(record.clone()));
        let spaced = line.replace(",\"", " ,\n\t\"").replace("\":", "\" : ");
        assert_eq!(parse(&spaced), Some(record));
        let minimal = r#"{"schema":1,"transaction_id":"t","end_time":"2026-11-27T10:00:00Z","model":"m","input_tokens":0,"output_tokens":10,"status":"failure"}"#;
        assert_eq!(parse(minimal), by_serde(minimal));
        assert!(parse(minimal).is_some());
    }

    #[test]
    fn leaves_to_serde_what_it_does_not_read_exactly() {
        let line = canonical();
        let cases = [
            line.replace("\"model\":\"gpt-4o\"", "\"model\":\"gpt\\u002d4o\""),
            line.replace("\"model\":\"gpt-4o\"", "\"model\":\"gpt\u{1}4o\""),
            line.replace("\"input_tokens\":7", "\"input_tokens\":7.0"),
            line.replace("\"input_tokens\":7", "\"input_tokens\":-7"),
            line.replace("\"input_tokens\":7", "\"input_tokens\":07"),
            line.replace("\"input_tokens\":7", "\"input_tokens\":1e3"),
            line.replace(
                "\"input_tokens\":7",
                "\"input_tokens\":18446744073709551616",
            ),
            line.replace("\"input_tokens\":7", "\"input_tokens\":null"),
            line.replace("\"schema\":1", "\"schema\":2"),
            line.replace("\"schema\":1,", "\"schema\":1,\"schema\":1,"),
            line.replace("\"schema\":1,", "\"schema\":1,\"extra\":{\"a\":[1]},"),
            line.replace("\"stream\":", "\"stream\":null,\"x\":"),
            line.replace(
                "\"end_time\":\"2026-11-27T10:00:00.250Z\"",
                "\"end_time\":\"yesterday\"",
            ),
            format!("{line}x"),
            format!("{line},"),
            line[..line.len() - 1].to_owned(),
            line.replace("\"response_cost\":", "\"response_cost\":1e400,\"r\":"),
        ];
        for case in &cases {
            assert_eq!(parse(case), None, "{case}");
        }
    }

    /// A small deterministic generator (xorshift), so the property below is the same each run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn one_in(&mut self, n: u64) -> bool {
            self.next().is_multiple_of(n)
        }
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }
    }

    /// Any line, however odd: when this reader answers, serde answers the same.
    #[test]
    fn never_answers_other_than_serde() {
        let values: &[(&str, &[&str])] = &[
            (
                "schema",
                &["1", "2", "1.0", "\"1\"", "null", "01", "4294967297"],
            ),
            (
                "transaction_id",
                &[
                    "\"t-1\"",
                    "\"\"",
                    "\"a\\\"b\"",
                    "\"\u{e9}t\u{1F600}\"",
                    "7",
                    "null",
                ],
            ),
            (
                "start_time",
                &[
                    "\"2026-11-27T10:00:00.000Z\"",
                    "null",
                    "\"2026-11-27T10:00:00+02:00\"",
                    "\"2026-13-01T00:00:00Z\"",
                    "\"2026-11-27T23:59:60.500Z\"",
                    "3",
                ],
            ),
            (
                "end_time",
                &[
                    "\"2026-11-27T10:00:00.250Z\"",
                    "\"2026-11-27t10:00:00.25z\"",
                    "null",
                    "\"x\"",
                    "\"2028-02-29T23:59:59.999Z\"",
                    "\"2026-02-29T00:00:00.000Z\"",
                    "\"2026-04-31T00:00:00.000Z\"",
                    "\"2026-11-27T24:00:00.000Z\"",
                    "\"2026-11-27T10:60:00.000Z\"",
                    "\"2026-11-27T10:00:60.000Z\"",
                    "\"0000-01-01T00:00:00.000Z\"",
                    "\"2026-11-27T10:00:00.250+00:00\"",
                    "\"2026-11-27 10:00:00.250Z\"",
                    "\"2026-1a-27T10:00:00.250Z\"",
                    "\"2026-11-27T10:00:00.2500Z\"",
                ],
            ),
            (
                "call_type",
                &[
                    "\"chat_completion\"",
                    "\"embedding\"",
                    "null",
                    "\"\\u0041\"",
                ],
            ),
            (
                "model",
                &["\"gpt-4o\"", "\"\"", "\"m\\/x\"", "[]", "\"tab\there\""],
            ),
            ("upstream_model", &["\"gpt-4o-2024\"", "null", "false"]),
            (
                "input_tokens",
                &[
                    "0",
                    "7",
                    "18446744073709551615",
                    "18446744073709551616",
                    "-1",
                    "1.5",
                    "1E2",
                    "00",
                    "null",
                    "\"7\"",
                ],
            ),
            ("output_tokens", &["15", "0", "2e0", "null"]),
            ("total_tokens", &["22", "null", "-0", "22.0"]),
            ("cache_read_input_tokens", &["0", "3", "null"]),
            ("cache_creation_input_tokens", &["0", "1"]),
            ("reasoning_tokens", &["0", "4", "true"]),
            ("usage_estimated", &["false", "true", "null", "0"]),
            (
                "response_cost",
                &[
                    "0.00012",
                    "0",
                    "1e-7",
                    "-0.0",
                    "1E400",
                    "null",
                    "12345678901234567890",
                    "0.1e1",
                    "\"0.1\"",
                    "1.",
                    ".5",
                    "--1",
                ],
            ),
            ("end_user_id", &["\"cust\"", "null", "\"\"", "5"]),
            ("user_id", &["\"u\"", "null"]),
            ("team_id", &["\"team\"", "null"]),
            ("key_alias", &["\"k\"", "null"]),
            ("key_hash", &["\"5e5e\"", "null"]),
            ("stream", &["true", "false", "null"]),
            (
                "status",
                &["\"success\"", "\"failure\"", "\"timeout\"", "null", "1"],
            ),
            ("duration_ms", &["420", "null", "4.2"]),
            ("unknown", &["1", "{\"a\":\"b\"}", "[1,2]"]),
        ];
        let spaces = ["", "", "", " ", "\n", "\t ", "\r\n"];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut answered = 0;
        for _ in 0..40_000 {
            let mut fields: Vec<(&str, &str)> = Vec::new();
            for (name, vals) in values {
                // The required fields are usually there; the rest come and go.
                let required = matches!(
                    *name,
                    "schema"
                        | "transaction_id"
                        | "end_time"
                        | "model"
                        | "input_tokens"
                        | "output_tokens"
                        | "status"
                );
                let kept = match *name {
                    _ if required => !rng.one_in(40),
                    "unknown" => rng.one_in(8),
                    _ => rng.one_in(2),
                };
                if !kept {
                    continue;
                }
                // Mostly the first (plain) value, so that many lines are readable.
                let v = if rng.one_in(24) {
                    rng.pick(vals)
                } else {
                    vals[0]
                };
                fields.push((name, v));
            }
            // Shuffle now and then; repeat a field now and then.
            if rng.one_in(3) {
                for i in (1..fields.len()).rev() {
                    fields.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
            }
            if rng.one_in(25) && !fields.is_empty() {
                let f = fields[(rng.next() % fields.len() as u64) as usize];
                fields.push(f);
            }
            let mut line = String::from(rng.pick(&spaces));
            line.push('{');
            for (i, (name, value)) in fields.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                line.push_str(rng.pick(&spaces));
                line.push_str(&format!("\"{name}\""));
                line.push_str(rng.pick(&spaces));
                line.push(':');
                line.push_str(rng.pick(&spaces));
                line.push_str(value);
                line.push_str(rng.pick(&spaces));
            }
            line.push('}');
            line.push_str(rng.pick(&["", "", " ", "}", ",", "x"]));
            if rng.one_in(30) {
                let mut cut = (rng.next() % (line.len() as u64 + 1)) as usize;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
            }
            if let Some(fast) = parse(&line) {
                answered += 1;
                assert_eq!(Some(fast), by_serde(&line), "{line}");
            }
        }
        // The property means little unless many lines were read by this reader.
        assert!(answered > 5_000, "only {answered} lines read");
    }

    #[test]
    fn the_proxys_timestamps_are_read_as_chrono_reads_them() {
        let mut t = chrono::DateTime::parse_from_rfc3339("2024-02-28T23:59:58.997Z")
            .unwrap()
            .with_timezone(&Utc);
        for _ in 0..5_000 {
            let text = crate::spend::fmt_millis(&t);
            assert_eq!(millis_utc(&text), Some(t), "{text}");
            t += chrono::Duration::milliseconds(997) + chrono::Duration::hours(7);
        }
        for text in [
            "2026-02-29T00:00:00.000Z",
            "2026-04-31T00:00:00.000Z",
            "2026-11-27T24:00:00.000Z",
            "2026-11-27T10:60:00.000Z",
            "2026-11-27T10:00:60.000Z",
            "2026-11-27T10:00:00.250z",
            "2026-11-27T10:00:00,250Z",
            "2026-11-27T10:00:00.25Z",
            "2026-11-27T1a:00:00.250Z",
        ] {
            assert_eq!(millis_utc(text), None, "{text}");
            assert_eq!(
                millis_utc(text).or_else(|| crate::spend::parse_time(text).ok()),
                crate::spend::parse_time(text).ok(),
                "{text}"
            );
        }
    }
}
