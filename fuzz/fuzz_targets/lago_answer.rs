//! The shipper's reading of a Lago answer (status, headers, body → what to do) on arbitrary
//! input: never panics, and its decisions keep their invariants.
//!
//! Input layout: 2 bytes status (big-endian, mod 1000; below 100 is skipped), 1 byte header count (mod 4), then per
//! header 1 byte name choice and 1 byte value length and the value, then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tally::ship::lago::{Answer, classify};

const NAMES: [&str; 4] = [
    "retry-after",
    "x-ratelimit-reset",
    "content-type",
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
    match classify(status, &headers, rest) {
        Answer::Accepted => assert!(status.is_success()),
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
