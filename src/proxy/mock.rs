//! Mock deployments (`litellm_params.mock_response`): answered locally, no network, with
//! deterministic usage — the prompt counted by the same estimate every time, the completion from
//! the mock text. Used by `tally demo`, the client tests and the benchmarks.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::tokens;
use super::upstream::Usage;

/// The usage a mock chat answer reports for this request.
pub fn chat_usage(request: &Map<String, Value>, text: &str) -> Usage {
    Usage::new(
        tokens::estimate_messages(request),
        tokens::estimate_text(text),
    )
}

/// A complete `chat.completion` object.
pub fn chat_completion(id: &str, model: &str, text: &str, usage: Usage, created: i64) -> Bytes {
    let body = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage_json(usage),
        "system_fingerprint": null,
    });
    Bytes::from(body.to_string())
}

/// The same answer as server-sent events, one word per chunk, ending with a usage-only chunk and
/// `data: [DONE]` — exactly what an OpenAI upstream sends with `include_usage`.
pub fn chat_stream(id: &str, model: &str, text: &str, usage: Usage, created: i64) -> Vec<Bytes> {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    // Split after each space so the pieces concatenate back to the exact text.
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(' ').map_or(rest.len(), |i| i + 1);
        let (piece, tail) = rest.split_at(end);
        events.push(chunk(json!({"content": piece}), Value::Null));
        rest = tail;
    }
    events.push(chunk(json!({}), json!("stop")));
    events.push(json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_json(usage),
    }));
    let mut out: Vec<Bytes> = events
        .into_iter()
        .map(|e| Bytes::from(format!("data: {e}\n\n")))
        .collect();
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

/// Dimensions of a mock embedding vector.
const MOCK_DIMENSIONS: usize = 8;

/// A `list` of embeddings, one per input, each a deterministic function of the input text.
pub fn embeddings(model: &str, request: &Map<String, Value>, usage: Usage) -> Bytes {
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::Array(items)) => items.iter().map(Value::to_string).collect(),
        Some(other) => vec![other.to_string()],
        None => Vec::new(),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            json!({"object": "embedding", "index": index, "embedding": vector(text)})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    });
    Bytes::from(body.to_string())
}

fn vector(text: &str) -> Vec<f64> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    digest
        .iter()
        .take(MOCK_DIMENSIONS)
        .map(|b| f64::from(*b) / 255.0)
        .collect()
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_pieces_reassemble_the_text_and_end_with_usage_then_done() {
        let events = chat_stream("x", "m", "Hello from mock", Usage::new(5, 4), 0);
        let mut text = String::new();
        for e in &events[..events.len() - 1] {
            let v: Value =
                serde_json::from_slice(e.strip_prefix(b"data: ").unwrap().trim_ascii()).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(c);
            }
        }
        assert_eq!(text, "Hello from mock");
        assert!(events[events.len() - 2].starts_with(b"data: {"));
        assert!(String::from_utf8_lossy(&events[events.len() - 2]).contains("\"total_tokens\":9"));
        assert_eq!(&events[events.len() - 1][..], b"data: [DONE]\n\n");
    }
}
