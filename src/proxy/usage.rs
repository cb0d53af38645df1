//! Token usage as the upstream reported it, in every shape tally relays, read into one form.
//!
//! The shapes (each may arrive in a whole answer or in the streamed usage chunk):
//! - OpenAI chat (and the OpenAI-wire providers): `prompt_tokens` (every prompt token, cached or
//!   not), `completion_tokens`, `prompt_tokens_details.cached_tokens`,
//!   `completion_tokens_details.reasoning_tokens`.
//! - OpenAI Responses API: `input_tokens` (cached included), `output_tokens`,
//!   `input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens`.
//! - Anthropic: `input_tokens` counts only the *uncached* prompt; `cache_read_input_tokens` and
//!   `cache_creation_input_tokens` come on top (and `cache_creation.ephemeral_1h_input_tokens`
//!   says how many of the writes were 1-hour writes). LiteLLM-shaped answers carry the Anthropic
//!   fields next to `prompt_tokens`, which then already includes them.
//! - DeepSeek: `prompt_cache_hit_tokens` (its `prompt_tokens` includes them).
//!
//! A `null` anywhere counts as absent. Read with serde straight from the bytes (no `Value` tree).

use serde::{Deserialize, Deserializer};

/// Token usage of one call. `prompt_tokens` counts every prompt token, cached or not, as
/// LiteLLM's `prompt_tokens` does; the cache and reasoning counts are subsets of the prompt and
/// completion counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: Option<u64>,
    /// Prompt tokens read from the provider's cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's cache (all lifetimes).
    pub cache_creation_tokens: u64,
    /// Of `cache_creation_tokens`, those written with a 1-hour lifetime (Anthropic), priced at
    /// `cache_creation_input_token_cost_above_1hr` where the table has it.
    pub cache_creation_1h_tokens: u64,
    /// Completion tokens spent on reasoning.
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: Some(prompt_tokens.saturating_add(completion_tokens)),
            ..Self::default()
        }
    }

    /// Prompt tokens billed at the plain input price (neither read from nor written to a cache).
    pub fn uncached_prompt_tokens(&self) -> u64 {
        self.prompt_tokens
            .saturating_sub(self.cache_read_tokens)
            .saturating_sub(self.cache_creation_tokens)
    }
}

/// Every field any of the shapes uses; absent and `null` alike are `None`.
#[derive(Deserialize, Default)]
struct Raw {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation: Option<CacheCreation>,
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

impl From<Raw> for Usage {
    fn from(r: Raw) -> Self {
        let detail = |d: &Option<Details>, f: fn(&Details) -> Option<u64>| d.as_ref().and_then(f);
        let cache_read = detail(&r.prompt_tokens_details, |d| d.cached_tokens)
            .or_else(|| detail(&r.input_tokens_details, |d| d.cached_tokens))
            .or(r.cache_read_input_tokens)
            .or(r.prompt_cache_hit_tokens)
            .unwrap_or(0);
        let cache_creation = r
            .cache_creation_input_tokens
            .or_else(|| detail(&r.prompt_tokens_details, |d| d.cache_creation_tokens))
            .unwrap_or(0);
        let reasoning = detail(&r.completion_tokens_details, |d| d.reasoning_tokens)
            .or_else(|| detail(&r.output_tokens_details, |d| d.reasoning_tokens))
            .unwrap_or(0);
        let prompt = match (r.prompt_tokens, r.input_tokens) {
            (Some(p), _) => p,
            // Anthropic's `input_tokens` leaves out what the cache served or stored; the
            // Responses API's (which has `input_tokens_details`) includes it.
            (None, Some(i))
                if r.input_tokens_details.is_none()
                    && (r.cache_read_input_tokens.is_some()
                        || r.cache_creation_input_tokens.is_some()) =>
            {
                i.saturating_add(cache_read).saturating_add(cache_creation)
            }
            (None, Some(i)) => i,
            (None, None) => 0,
        };
        let completion = r.completion_tokens.or(r.output_tokens).unwrap_or(0);
        let one_hour = r
            .cache_creation
            .and_then(|c| c.ephemeral_1h_input_tokens)
            .unwrap_or(0)
            .min(cache_creation);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: r.total_tokens,
            cache_read_tokens: cache_read.min(prompt),
            cache_creation_tokens: cache_creation.min(prompt.saturating_sub(cache_read)),
            cache_creation_1h_tokens: one_hour,
            reasoning_tokens: reasoning.min(completion),
        }
    }
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Raw::deserialize(d).map(Usage::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Usage {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn openai_chat_with_cached_and_reasoning_tokens() {
        let u = parse(
            r#"{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,
                "prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},
                "completion_tokens_details":{"reasoning_tokens":192,"audio_tokens":0}}"#,
        );
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (2006, 300, Some(2306))
        );
        assert_eq!((u.cache_read_tokens, u.reasoning_tokens), (1920, 192));
        assert_eq!(u.cache_creation_tokens, 0);
        assert_eq!(u.uncached_prompt_tokens(), 86);
    }

    #[test]
    fn nulls_and_missing_details_are_zero() {
        let u = parse(
            r#"{"prompt_tokens":7,"completion_tokens":15,"total_tokens":22,
                "prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}"#,
        );
        assert_eq!(u, Usage::new(7, 15));
    }

    #[test]
    fn responses_api_input_tokens_include_the_cached_ones() {
        let u = parse(
            r#"{"input_tokens":5000,"output_tokens":800,"total_tokens":5800,
                "input_tokens_details":{"cached_tokens":4096},
                "output_tokens_details":{"reasoning_tokens":512}}"#,
        );
        assert_eq!((u.prompt_tokens, u.completion_tokens), (5000, 800));
        assert_eq!((u.cache_read_tokens, u.reasoning_tokens), (4096, 512));
    }

    #[test]
    fn anthropic_input_tokens_exclude_cache_reads_and_writes() {
        let u = parse(
            r#"{"input_tokens":50,"output_tokens":100,"cache_read_input_tokens":10000,
                "cache_creation_input_tokens":2000,
                "cache_creation":{"ephemeral_5m_input_tokens":500,"ephemeral_1h_input_tokens":1500}}"#,
        );
        assert_eq!(u.prompt_tokens, 12_050);
        assert_eq!(u.cache_read_tokens, 10_000);
        assert_eq!(u.cache_creation_tokens, 2_000);
        assert_eq!(u.cache_creation_1h_tokens, 1_500);
        assert_eq!(u.uncached_prompt_tokens(), 50);
        assert_eq!(u.total_tokens, None);
    }

    #[test]
    fn litellm_shaped_anthropic_usage_keeps_prompt_tokens_as_the_total() {
        let u = parse(
            r#"{"prompt_tokens":12050,"completion_tokens":100,"total_tokens":12150,
                "cache_read_input_tokens":10000,"cache_creation_input_tokens":2000,
                "prompt_tokens_details":{"cached_tokens":10000}}"#,
        );
        assert_eq!(u.prompt_tokens, 12_050);
        assert_eq!(
            (u.cache_read_tokens, u.cache_creation_tokens),
            (10_000, 2_000)
        );
    }

    #[test]
    fn deepseek_cache_hits() {
        let u = parse(
            r#"{"prompt_tokens":1000,"completion_tokens":20,"total_tokens":1020,
                "prompt_cache_hit_tokens":768,"prompt_cache_miss_tokens":232}"#,
        );
        assert_eq!((u.prompt_tokens, u.cache_read_tokens), (1000, 768));
    }

    #[test]
    fn classes_never_exceed_what_they_are_part_of() {
        let u = parse(
            r#"{"prompt_tokens":10,"completion_tokens":5,
                "prompt_tokens_details":{"cached_tokens":50},
                "completion_tokens_details":{"reasoning_tokens":9}}"#,
        );
        assert_eq!((u.cache_read_tokens, u.reasoning_tokens), (10, 5));
        assert_eq!(u.uncached_prompt_tokens(), 0);
    }
}
