//! `/chat/completions` to an `anthropic/` deployment: the OpenAI request translated to Anthropic's
//! Messages API, and the answer (whole or streamed) translated back, as LiteLLM does
//! (`litellm/llms/anthropic/chat/transformation.py`).
//!
//! - `system` messages become `system`; `tool` messages become `tool_result` blocks of a user
//!   turn; an assistant's `tool_calls` become `tool_use` blocks; `image_url` parts become image
//!   blocks (a `data:` URL as base64, another URL as `url`).
//! - `max_tokens` (or `max_completion_tokens`) defaults to LiteLLM's 4096; `stop` becomes
//!   `stop_sequences`; `user` becomes `metadata.user_id`; `tools` / `tool_choice` are mapped.
//! - Stop reasons: `end_turn`/`stop_sequence` → `stop`, `max_tokens` → `length`, `tool_use` →
//!   `tool_calls`.
//! - Usage: `prompt_tokens` counts the cache reads and writes too (as LiteLLM's), with
//!   `prompt_tokens_details.cached_tokens` and the Anthropic cache fields beside it.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::error::ProxyError;
use super::stream::EventSplitter;

/// LiteLLM's `DEFAULT_MAX_TOKENS` for Anthropic, sent when the client gives none (Anthropic
/// requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The Messages API request for an OpenAI chat request.
pub fn request(body: &Map<String, Value>, model: &str) -> Result<Vec<u8>, ProxyError> {
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let Some(Value::Array(input)) = body.get("messages") else {
        return Err(ProxyError::bad_param(
            "messages",
            "`messages` must be an array of chat messages",
        ));
    };
    for (i, m) in input.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                for block in blocks(content, i)? {
                    if block.get("type") == Some(&json!("text")) {
                        system.push(block);
                    }
                }
            }
            "user" => push(&mut messages, "user", blocks(content, i)?),
            "assistant" => {
                let mut parts = blocks(content, i)?;
                if let Some(Value::Array(calls)) = m.get("tool_calls") {
                    for call in calls {
                        let f = &call["function"];
                        let args = f["arguments"].as_str().unwrap_or("{}");
                        let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
                        parts.push(json!({"type": "tool_use", "id": call["id"],
                            "name": f["name"], "input": input}));
                    }
                }
                push(&mut messages, "assistant", parts);
            }
            "tool" | "function" => {
                let text = match content {
                    Value::String(s) => json!(s),
                    other => json!(blocks(other, i)?),
                };
                let id = m.get("tool_call_id").cloned().unwrap_or(Value::Null);
                push(
                    &mut messages,
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": text})],
                );
            }
            other => {
                return Err(ProxyError::bad_param(
                    format!("messages[{i}].role"),
                    format!(
                        "role {other:?} is not one of system, developer, user, assistant, tool"
                    ),
                ));
            }
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    for name in ["temperature", "top_p", "top_k", "stream"] {
        if let Some(v) = body.get(name).filter(|v| !v.is_null()) {
            out.insert(name.into(), v.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            out.insert("stop_sequences".into(), json!(a));
        }
        _ => {}
    }
    if let Some(Value::String(user)) = body.get("user")
        && !user.is_empty()
    {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(Value::Array(tools)) = body.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                let mut tool = json!({"name": f["name"],
                    "input_schema": f.get("parameters").cloned()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}}))});
                if let Some(d) = f.get("description") {
                    tool["description"] = d.clone();
                }
                tool
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    let choice = match body.get("tool_choice") {
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => None,
        },
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .map(|name| json!({"type": "tool", "name": name})),
        _ => None,
    };
    if let Some(choice) = choice {
        out.insert("tool_choice".into(), choice);
    }
    serde_json::to_vec(&Value::Object(out))
        .map_err(|e| ProxyError::Internal(format!("encoding the Anthropic request: {e}")))
}

/// Appends a turn, merging it into the previous one of the same role (Anthropic wants turns to
/// alternate; OpenAI sends consecutive tool results as separate messages).
fn push(messages: &mut Vec<Value>, role: &str, content: Vec<Value>) {
    if let Some(last) = messages.last_mut()
        && last["role"] == role
        && let Some(Value::Array(blocks)) = last.get_mut("content")
    {
        blocks.extend(content);
        return;
    }
    messages.push(json!({"role": role, "content": content}));
}

/// An OpenAI message's `content` as Anthropic content blocks.
fn blocks(content: &Value, i: usize) -> Result<Vec<Value>, ProxyError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Ok(json!({"type": "text", "text": p["text"]})),
                Some("image_url") => {
                    let url = p["image_url"]
                        .get("url")
                        .or(Some(&p["image_url"]))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    Ok(image(url))
                }
                other => Err(ProxyError::bad_param(
                    format!("messages[{i}].content"),
                    format!(
                        "content part type {other:?} cannot be sent to an anthropic/ model (text and image_url can)"
                    ),
                )),
            })
            .collect(),
        _ => Err(ProxyError::bad_param(
            format!("messages[{i}].content"),
            "`content` must be a string or an array of parts",
        )),
    }
}

fn image(url: &str) -> Value {
    // data:<media type>;base64,<data>
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media, data)) = rest.split_once(";base64,")
    {
        return json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}});
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

fn finish_reason(stop: Option<&str>) -> Value {
    match stop {
        Some("end_turn" | "stop_sequence") => json!("stop"),
        Some("max_tokens") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some("refusal") => json!("content_filter"),
        Some(other) => json!(other),
        None => Value::Null,
    }
}

/// Anthropic's usage in OpenAI's shape, with LiteLLM's extra cache fields.
fn usage(u: &Map<String, Value>) -> Value {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, read, write, output) = (
        n("input_tokens"),
        n("cache_read_input_tokens"),
        n("cache_creation_input_tokens"),
        n("output_tokens"),
    );
    let prompt = input + read + write;
    json!({"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": read},
        "cache_read_input_tokens": read, "cache_creation_input_tokens": write})
}

/// A whole Messages API answer as an OpenAI chat completion.
pub fn response(bytes: &[u8], created: i64) -> Result<Vec<u8>, ProxyError> {
    let m: Map<String, Value> = serde_json::from_slice(bytes).map_err(|e| {
        ProxyError::Internal(format!("the anthropic upstream's answer is not JSON: {e}"))
    })?;
    let mut text = String::new();
    let mut calls = Vec::new();
    if let Some(Value::Array(content)) = m.get("content") {
        for block in content {
            match block["type"].as_str() {
                Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
                Some("tool_use") => calls.push(json!({"id": block["id"], "type": "function",
                    "function": {"name": block["name"], "arguments": block["input"].to_string()}})),
                _ => {}
            }
        }
    }
    let mut message = json!({"role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let empty = Map::new();
    let u = m.get("usage").and_then(Value::as_object).unwrap_or(&empty);
    let answer = json!({"id": m.get("id"), "object": "chat.completion", "created": created,
        "model": m.get("model"),
        "choices": [{"index": 0, "message": message,
            "finish_reason": finish_reason(m.get("stop_reason").and_then(Value::as_str))}],
        "usage": usage(u)});
    serde_json::to_vec(&answer)
        .map_err(|e| ProxyError::Internal(format!("encoding the chat completion: {e}")))
}

/// An Anthropic error body (`{"type":"error","error":{"type","message"}}`) in OpenAI's shape;
/// anything else unchanged.
pub fn error_body(body: &Bytes) -> Bytes {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return body.clone();
    };
    let Some(e) = v.get("error").filter(|_| v["type"] == "error") else {
        return body.clone();
    };
    Bytes::from(
        json!({"error": {"message": e["message"], "type": e["type"], "param": null, "code": null}})
            .to_string(),
    )
}

/// Translates a Messages API event stream into chat completion chunks, as bytes arrive.
pub struct StreamTranslator {
    events: EventSplitter,
    id: String,
    model: String,
    created: i64,
    usage: Map<String, Value>,
    /// Anthropic's content block index → OpenAI's tool call index.
    tool_index: Vec<(u64, usize)>,
}

impl StreamTranslator {
    pub fn new(created: i64) -> Self {
        Self {
            events: EventSplitter::default(),
            id: String::new(),
            model: String::new(),
            created,
            usage: Map::new(),
            tool_index: Vec::new(),
        }
    }

    fn chunk(&self, delta: Value, finish: Value) -> String {
        let c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    }

    /// The chunks for the bytes received (empty until an event is complete).
    pub fn push(&mut self, bytes: &[u8]) -> Bytes {
        self.events.push(bytes);
        let mut out = String::new();
        while let Some(event) = self.events.next_event() {
            let Ok(text) = std::str::from_utf8(&event) else {
                continue;
            };
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            let Ok(e) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            match e["type"].as_str() {
                Some("message_start") => {
                    let m = &e["message"];
                    self.id = m["id"].as_str().unwrap_or_default().to_owned();
                    self.model = m["model"].as_str().unwrap_or_default().to_owned();
                    if let Some(u) = m["usage"].as_object() {
                        self.usage.extend(u.clone());
                    }
                    out.push_str(
                        &self.chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                    );
                }
                Some("content_block_start") if e["content_block"]["type"] == "tool_use" => {
                    let index = self.tool_index.len();
                    self.tool_index
                        .push((e["index"].as_u64().unwrap_or(0), index));
                    let b = &e["content_block"];
                    out.push_str(&self.chunk(
                        json!({"tool_calls": [{"index": index, "id": b["id"], "type": "function",
                            "function": {"name": b["name"], "arguments": ""}}]}),
                        Value::Null,
                    ));
                }
                Some("content_block_delta") => {
                    let d = &e["delta"];
                    match d["type"].as_str() {
                        Some("text_delta") => {
                            out.push_str(&self.chunk(json!({"content": d["text"]}), Value::Null))
                        }
                        Some("input_json_delta") => {
                            let block = e["index"].as_u64().unwrap_or(0);
                            let index = self
                                .tool_index
                                .iter()
                                .find(|(b, _)| *b == block)
                                .map_or(0, |(_, i)| *i);
                            out.push_str(&self.chunk(
                                json!({"tool_calls": [{"index": index,
                                    "function": {"arguments": d["partial_json"]}}]}),
                                Value::Null,
                            ));
                        }
                        _ => {}
                    }
                }
                Some("message_delta") => {
                    if let Some(u) = e["usage"].as_object() {
                        for (k, v) in u {
                            if !v.is_null() {
                                self.usage.insert(k.clone(), v.clone());
                            }
                        }
                    }
                    let finish = finish_reason(e["delta"]["stop_reason"].as_str());
                    out.push_str(&self.chunk(json!({}), finish));
                    // The usage chunk (the relay passes it on only if the client asked for it).
                    let c = json!({"id": self.id, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.model, "choices": [],
                        "usage": usage(&self.usage)});
                    out.push_str(&format!("data: {c}\n\n"));
                }
                Some("error") => {
                    let c = json!({"error": e["error"]});
                    out.push_str(&format!("data: {c}\n\n"));
                }
                _ => {}
            }
        }
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_request_becomes_a_messages_request() {
        let body = json!({"model": "claude", "user": "cust-1", "stop": "END",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "what is in"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function", "function": {"name": "get", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
            "tools": [{"type": "function", "function": {"name": "get", "description": "d",
                "parameters": {"type": "object"}}}],
            "tool_choice": "required"});
        let out: Value =
            serde_json::from_slice(&request(body.as_object().unwrap(), "claude-x").unwrap())
                .unwrap();
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(out["system"], json!([{"type": "text", "text": "be brief"}]));
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["metadata"], json!({"user_id": "cust-1"}));
        assert_eq!(out["tool_choice"], json!({"type": "any"}));
        assert_eq!(out["tools"][0]["input_schema"], json!({"type": "object"}));
        let m = out["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0]["content"][1]["source"]["media_type"], "image/png");
        assert_eq!(m[1]["content"][0]["input"], json!({"q": 1}));
        assert_eq!(m[2]["content"][0]["tool_use_id"], "call_1");
    }

    #[test]
    fn an_answer_and_its_usage_come_back_in_openai_shape() {
        let answer = json!({"id": "msg_1", "model": "claude-x", "stop_reason": "tool_use",
            "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {"q": 1}}],
            "usage": {"input_tokens": 50, "output_tokens": 100,
                      "cache_read_input_tokens": 10000, "cache_creation_input_tokens": 2000}});
        let out: Value =
            serde_json::from_slice(&response(answer.to_string().as_bytes(), 0).unwrap()).unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"q\":1}"
        );
        assert_eq!(out["usage"]["prompt_tokens"], 12_050);
        let u: super::super::usage::Usage = serde_json::from_value(out["usage"].clone()).unwrap();
        assert_eq!(
            (
                u.prompt_tokens,
                u.cache_read_tokens,
                u.cache_creation_tokens
            ),
            (12_050, 10_000, 2_000)
        );
    }
}
