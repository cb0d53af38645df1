//! Token estimates, used only when the upstream reports no usage (the record is then marked
//! `usage_estimated: true`) and for the mock model's deterministic usage.
//!
//! The estimate is OpenAI's published rule of thumb — about four characters of English text per
//! token — rounded up per text, plus OpenAI's documented framing overhead for chat messages
//! (3 tokens per message, 3 to prime the reply). It is deterministic, needs no vocabulary file,
//! and is within a few percent of `o200k_base` on English prose; code and non-Latin scripts
//! count higher. A real tokenizer was left out on purpose: it would add megabytes of vocabulary
//! and start-up time for a fallback path that well-behaved upstreams never take.

use serde_json::Value;

const CHARS_PER_TOKEN: usize = 4;
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_REPLY: u64 = 3;

/// Estimated tokens of one piece of text.
pub fn estimate_text(text: &str) -> u64 {
    let chars = text.chars().count();
    chars.div_ceil(CHARS_PER_TOKEN) as u64
}

/// Estimated prompt tokens of a chat request's `messages` (or 0 when absent).
pub fn estimate_messages(body: &serde_json::Map<String, Value>) -> u64 {
    let Some(Value::Array(messages)) = body.get("messages") else {
        return 0;
    };
    let mut total = TOKENS_PER_REPLY;
    for message in messages {
        total += TOKENS_PER_MESSAGE;
        if let Value::Object(fields) = message {
            for (name, value) in fields {
                total += estimate_value(value);
                if name == "name" {
                    total += 1;
                }
            }
        }
    }
    total
}

/// Estimated tokens of an embeddings request's `input` (a string, strings, or token arrays).
pub fn estimate_embedding_input(body: &serde_json::Map<String, Value>) -> u64 {
    match body.get("input") {
        Some(Value::String(s)) => estimate_text(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => estimate_text(s),
                // Already tokenized: one number per token.
                Value::Array(tokens) => tokens.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Strings count as text; structured content (multi-part messages, tool calls) counts the text
/// of its string leaves.
fn estimate_value(value: &Value) -> u64 {
    match value {
        Value::String(s) => estimate_text(s),
        Value::Array(items) => items.iter().map(estimate_value).sum(),
        Value::Object(map) => map.values().map(estimate_value).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_four_characters_per_token_rounded_up() {
        assert_eq!(estimate_text(""), 0);
        assert_eq!(estimate_text("abcd"), 1);
        assert_eq!(estimate_text("abcde"), 2);
        assert_eq!(estimate_text("héllo"), 2, "characters, not bytes");
    }

    #[test]
    fn chat_messages_add_framing_overhead() {
        let body = json!({"messages": [{"role": "user", "content": "Hello there!"}]});
        // 3 (reply) + 3 (message) + "user" 1 + "Hello there!" 3
        assert_eq!(estimate_messages(body.as_object().unwrap()), 10);
        let body = json!({"input": ["abcd", "abcdefgh", [1, 2, 3]]});
        assert_eq!(estimate_embedding_input(body.as_object().unwrap()), 6);
    }
}
