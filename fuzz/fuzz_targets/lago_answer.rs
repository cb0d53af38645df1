//! The shipper's reading of a Lago answer (status, headers, body → what to do) on arbitrary
//! input: never panics, and its decisions keep their invariants.
//!
//! Input layout: 2 bytes status (big-endian, mod 1000; below 100 is skipped), 1 byte header count (mod 4), then per
//! header 1 byte name choice and 1 byte value length and the value, 1 byte events sent, then the
//! body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tally::ship::lago::{Answer, classify};

const NAMES: [&str; 4] = [
    "retry-after",
    "x-ratelimit-reset",
    "location",
    "x-other",
];

fuzz_target!(|data: &[u8]| {
    let Some((status, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let code = u16::from_be_bytes(*status) % 1000;
    let Ok(status) = StatusCode::from_u16(code) else {
        return;
    };
    let mut headers = HeaderMap::new();
    let mut rest = rest;
    let count = rest.first().map_or(0, |c| c % 4);
    rest = rest.get(1..).unwrap_or_default();
    for _ in 0..count {
        let [name, len, tail @ ..] = rest else { break };
        let len = usize::from(*len).min(tail.len());
        if let Ok(value) = HeaderValue::from_bytes(&tail[..len]) {
            headers.append(
                HeaderName::from_static(NAMES[usize::from(*name) % 4]),
                value,
            );
        }
        rest = &tail[len..];
    }
    // One byte says how many events the batch had.
    let Some((&sent, rest)) = rest.split_first() else {
        return;
    };
    let ids: Vec<String> = (0..sent).map(|i| format!("id-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    match classify(status, &headers, rest, &ids) {
        // Only a 200 with Lago's envelope acks (a redirect or any 2xx body did once:
        // docs/reliability.md, "Findings").
        Answer::Accepted => assert_eq!(code, 200),
        Answer::NotAnAck { status, body } => {
            assert!((200..300).contains(&status));
            assert!(body.len() <= 2000 + '…'.len_utf8());
        }
        Answer::Redirected { status, location, .. } => {
            assert!((300..400).contains(&status));
            // Printable: no control character of a hostile Location reaches a log or terminal.
            assert!(location.is_none_or(|l| !l.chars().any(char::is_control)));
        }
        Answer::TooLarge { body } => {
            assert_eq!(code, 413);
            assert!(body.len() <= 2000 + '…'.len_utf8());
        }
        Answer::RateLimited { wait } => {
            assert_eq!(code, 429);
            // A broken header must never park the shipper for more than an hour.
            assert!(wait.is_none_or(|w| w.as_secs() <= 3600));
        }
        Answer::PerIndex(map) => {
            assert_eq!(code, 422);
            assert!(!map.is_empty());
        }
        Answer::Unauthorized { status, body } | Answer::Transient { status, body } => {
            assert_eq!(status, code);
            assert!(body.len() <= 2000 + '…'.len_utf8());
        }
        Answer::BadRequest { body } | Answer::Unprocessable { body } => {
            assert!(body.len() <= 2000 + '…'.len_utf8());
        }
    }
});
