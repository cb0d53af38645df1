//! The proxy's config.yaml parser on arbitrary text, with an empty environment: never panics,
//! whatever the YAML (anchors, deep nesting, wrong types, huge numbers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::proxy::config::ProxyConfig;

fuzz_target!(|text: &str| {
    let _ = ProxyConfig::load_from_str(text, "fuzz.yaml", &|_| None);
});
