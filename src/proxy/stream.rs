//! Relaying a streamed (`stream: true`) answer: server-sent events are forwarded to the client
//! one by one as they arrive, while the usage is picked out of them for the spend record.
//!
//! - The usage-only chunk (`choices: []`, `usage: {...}`) that tally asked the upstream for is
//!   forwarded only if the client asked for it too.
//! - The upstream's `data: [DONE]` is held back until the spend record is written, so a client
//!   that saw `[DONE]` knows the call is on the books.
//! - If the client disconnects, the upstream is still read to its end (bounded by the
//!   deployment's timeout): the provider generates — and bills — the whole answer anyway, and
//!   reading on gets its exact usage instead of an estimate.

use std::future::Future;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::tokens;
use super::upstream::Usage;

/// What the relay saw, for the spend record.
#[derive(Debug, Default)]
pub struct StreamOutcome {
    /// Usage the upstream reported, if it did.
    pub usage: Option<Usage>,
    /// Estimated tokens of the text received (used when `usage` is `None`).
    pub estimated_completion_tokens: u64,
    pub upstream_model: Option<String>,
    /// The upstream stream broke off with an error, or sent an `error` event (not billed).
    pub upstream_error: Option<String>,
    /// The error came as the upstream's own `error` event, which the client has already been
    /// sent: the stream then ends as the upstream ended it.
    pub error_event_sent: bool,
    pub client_gone: bool,
}

pub type ClientSender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// The event format of a stream, which says where its usage is and which event ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI chat chunks ending in `data: [DONE]` (sent by the proxy once the record is written).
    Chat { client_wants_usage: bool },
    /// Anthropic's Messages events: usage in `message_start.message.usage`, the output count
    /// updated (cumulatively) by `message_delta.usage`; `message_stop` is held back until the
    /// record is written.
    Anthropic,
    /// OpenAI's Responses events: usage in `response.completed` (or `.incomplete` / `.failed`),
    /// which is held back until the record is written. No `[DONE]`.
    Responses,
}

/// Forwards `source` to `client`; calls `finish` with what it saw once the upstream ends and,
/// if `finish` says the record was written, sends `data: [DONE]`.
pub async fn relay<S, E, F, Fut>(mut source: S, client: ClientSender, wire: Wire, finish: F)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
    F: FnOnce(StreamOutcome) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut events = EventSplitter::default();
    let mut outcome = StreamOutcome::default();
    let mut completion_text = String::new();
    // Anthropic: the usage members seen so far (`message_delta` updates `message_start`'s).
    let mut usage_fields = Map::new();
    // The terminal event of an Anthropic or Responses stream, sent once the record is written.
    let mut held: Option<Bytes> = None;
    let (chat, client_wants_usage) = match wire {
        Wire::Chat { client_wants_usage } => (true, client_wants_usage),
        Wire::Anthropic | Wire::Responses => (false, false),
    };

    let forward = async |event: Bytes, outcome: &mut StreamOutcome| {
        if !outcome.client_gone && client.send(Ok(event)).await.is_err() {
            outcome.client_gone = true;
            tracing::debug!("client went away mid-stream; reading the upstream to its end");
        }
    };

    loop {
        let chunk = match source.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                outcome.upstream_error = Some(e.to_string());
                break;
            }
            None => break,
        };
        events.push(&chunk);
        while let Some(event) = events.next_event() {
            if !chat {
                let terminal = inspect_typed(
                    &event,
                    &mut outcome,
                    &mut usage_fields,
                    &mut completion_text,
                );
                if terminal && held.is_none() && outcome.upstream_error.is_none() {
                    held = Some(event);
                } else {
                    forward(event, &mut outcome).await;
                    // Only an `error` event sets it inside the loop.
                    outcome.error_event_sent |= outcome.upstream_error.is_some();
                }
                continue;
            }
            match inspect(&event) {
                Seen::Done => {}
                Seen::Chunk(c) if c.error.is_some() => {
                    outcome.upstream_error = Some(chunk_error_text(c.error.as_ref()));
                    forward(event, &mut outcome).await;
                    outcome.error_event_sent = true;
                }
                Seen::Chunk(c) => {
                    let usage_only = c.choices.is_empty() && c.usage.is_some();
                    if let Some(usage) = c.usage {
                        outcome.usage = Some(usage);
                    }
                    if outcome.upstream_model.is_none() {
                        outcome.upstream_model = c.model;
                    }
                    for choice in c.choices {
                        if let Some(text) = choice.delta.and_then(|d| d.content) {
                            completion_text.push_str(&text);
                        }
                    }
                    if !usage_only || client_wants_usage {
                        forward(event, &mut outcome).await;
                    }
                }
                Seen::Other => forward(event, &mut outcome).await,
            }
        }
    }
    if let Some(rest) = events.finish() {
        forward(rest, &mut outcome).await;
    }
    if !usage_fields.is_empty() {
        outcome.usage = serde_json::from_value(Value::Object(usage_fields)).ok();
    }
    outcome.estimated_completion_tokens = tokens::estimate_text(&completion_text);
    let failed = outcome.upstream_error.clone();
    let error_event_sent = outcome.error_event_sent;
    let client_gone = outcome.client_gone;
    let recorded = finish(outcome).await;
    if client_gone {
        return;
    }
    if error_event_sent {
        // The client has the upstream's own error event: the stream ends as the upstream's did.
    } else if let Some(reason) = failed {
        // Break the response off so the client sees an incomplete stream, not a clean end.
        let _ = client
            .send(Err(std::io::Error::other(format!(
                "upstream stream failed: {reason}"
            ))))
            .await;
    } else if recorded {
        let end = match (wire, held) {
            (Wire::Chat { .. }, _) => Bytes::from_static(b"data: [DONE]\n\n"),
            (_, Some(event)) => event,
            (_, None) => return,
        };
        let _ = client.send(Ok(end)).await;
    } else {
        let _ = client
            .send(Err(std::io::Error::other("spend log unavailable")))
            .await;
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    model: Option<String>,
    /// `data: {"error": {...}}`: OpenAI's mid-stream error, and an Anthropic `error` event
    /// translated to chat.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

enum Seen {
    Done,
    Chunk(Chunk),
    /// Comments, keep-alives, or data that is not a chunk: forwarded untouched.
    Other,
}

/// An Anthropic or Responses event, read for what the record needs.
#[derive(Deserialize)]
struct TypedEvent {
    #[serde(rename = "type", default)]
    kind: String,
    /// Anthropic `message_start` (an object), or a Responses `error` event's text (a string).
    #[serde(default)]
    message: Option<Value>,
    /// Anthropic `error`: `{"type": "overloaded_error", "message": "..."}`.
    #[serde(default)]
    error: Option<Value>,
    /// Responses `error`.
    #[serde(default)]
    code: Option<Value>,
    /// Anthropic `message_delta`.
    #[serde(default)]
    usage: Option<Map<String, Value>>,
    /// Anthropic `content_block_delta` (an object) or Responses `*.delta` (a string).
    #[serde(default)]
    delta: Option<Value>,
    /// Responses `response.created` / `response.completed`.
    #[serde(default)]
    response: Option<EventBody>,
}

#[derive(Deserialize)]
struct EventBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<Map<String, Value>>,
    /// A Responses `response.failed`: `{"code", "message"}`.
    #[serde(default)]
    error: Option<Value>,
}

/// What an upstream's mid-stream error says, for the log: its type (or code) and its message.
fn error_text(kind: Option<&Value>, message: Option<&Value>) -> String {
    format!(
        "the upstream sent an error mid-stream: {}: {}",
        kind.and_then(Value::as_str).unwrap_or("error"),
        message.and_then(Value::as_str).unwrap_or("(no message)")
    )
}

/// A chat chunk's or a failed response's `error` object: `{"type" or "code", "message"}`.
fn chunk_error_text(error: Option<&Value>) -> String {
    let field = |name: &str| error.and_then(|e| e.get(name));
    error_text(field("type").or_else(|| field("code")), field("message"))
}

/// An `error` event: Anthropic's nests `{"type", "message"}` under `error`; a Responses one has
/// `code` and `message` at the top.
fn error_event_text(e: &TypedEvent) -> String {
    match &e.error {
        Some(Value::Object(err)) => error_text(err.get("type"), err.get("message")),
        _ => error_text(e.code.as_ref(), e.message.as_ref()),
    }
}

/// Reads an Anthropic or Responses event into `outcome`, `usage` and `text`; true when it is the
/// stream's terminal event (held back until the record is written).
fn inspect_typed(
    event: &[u8],
    outcome: &mut StreamOutcome,
    usage: &mut Map<String, Value>,
    text: &mut String,
) -> bool {
    let Some(data) = event_data(event) else {
        return false;
    };
    let Ok(e) = serde_json::from_str::<TypedEvent>(&data) else {
        return false;
    };
    let merge = |usage: &mut Map<String, Value>, from: Map<String, Value>| {
        for (k, v) in from {
            if !v.is_null() {
                usage.insert(k, v);
            }
        }
    };
    match e.kind.as_str() {
        "message_start" => {
            if let Some(m) = e
                .message
                .and_then(|m| serde_json::from_value::<EventBody>(m).ok())
            {
                outcome.upstream_model = outcome.upstream_model.take().or(m.model);
                if let Some(u) = m.usage {
                    merge(usage, u);
                }
            }
            false
        }
        "message_delta" => {
            if let Some(u) = e.usage {
                merge(usage, u);
            }
            false
        }
        "content_block_delta" => {
            if let Some(Value::Object(d)) = e.delta {
                for field in ["text", "partial_json", "thinking"] {
                    if let Some(Value::String(t)) = d.get(field) {
                        text.push_str(t);
                    }
                }
            }
            false
        }
        "message_stop" => true,
        // Anthropic's mid-stream error (`overloaded_error`, `api_error`) or a Responses `error`:
        // the call failed, whatever usage came before it.
        "error" => {
            outcome.upstream_error = Some(error_event_text(&e));
            false
        }
        "response.output_text.delta" | "response.function_call_arguments.delta" => {
            if let Some(Value::String(t)) = e.delta {
                text.push_str(&t);
            }
            false
        }
        "response.created" => {
            if let Some(r) = e.response {
                outcome.upstream_model = outcome.upstream_model.take().or(r.model);
            }
            false
        }
        "response.completed" | "response.incomplete" | "response.failed" => {
            // A failed response is a failed call, like an `error` event, even with the usage
            // it reports; an incomplete one (cut at `max_output_tokens`) is billed as answered.
            if e.kind == "response.failed" {
                let error = e.response.as_ref().and_then(|r| r.error.as_ref());
                outcome.upstream_error = Some(chunk_error_text(error));
            }
            if let Some(r) = e.response {
                outcome.upstream_model = r.model.or(outcome.upstream_model.take());
                if let Some(u) = r.usage {
                    usage.clear();
                    merge(usage, u);
                }
            }
            true
        }
        _ => false,
    }
}

/// The `data:` lines of an event, joined.
fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    Some(data)
}

fn inspect(event: &[u8]) -> Seen {
    let Ok(text) = std::str::from_utf8(event) else {
        return Seen::Other;
    };
    let mut data = String::new();
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    let data = data.trim();
    if data == "[DONE]" {
        return Seen::Done;
    }
    match serde_json::from_str::<Chunk>(data) {
        Ok(chunk) => Seen::Chunk(chunk),
        Err(_) => Seen::Other,
    }
}

/// Splits a byte stream into server-sent events (each ending with a blank line), whatever the
/// chunk boundaries of the transport.
#[derive(Default)]
pub struct EventSplitter {
    buffer: BytesMut,
}

impl EventSplitter {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete event, including its terminating blank line.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = event_end(&self.buffer)?;
        Some(self.buffer.split_to(end).freeze())
    }

    /// Whatever is left when the stream ends without a final blank line.
    pub fn finish(self) -> Option<Bytes> {
        (!self.buffer.iter().all(u8::is_ascii_whitespace)).then(|| self.buffer.freeze())
    }
}

/// End offset (exclusive) of the first event: after `\n\n` or `\r\n\r\n`.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_arbitrary_chunk_boundaries() {
        let input = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n";
        for cut in 1..input.len() {
            let mut s = EventSplitter::default();
            let mut out = Vec::new();
            for part in [&input[..cut], &input[cut..]] {
                s.push(part);
                while let Some(e) = s.next_event() {
                    out.push(e);
                }
            }
            assert_eq!(out.len(), 4, "cut at {cut}");
            assert_eq!(out.concat(), input.to_vec());
            assert!(s.finish().is_none());
        }
    }

    #[tokio::test]
    async fn strips_the_usage_chunk_unless_asked_and_sends_done_after_the_record() {
        for wants_usage in [false, true] {
            let events = super::super::mock::chat_stream("id", "m", "a b", Usage::new(3, 2), 0);
            let source = futures::stream::iter(events.into_iter().map(Ok::<_, std::io::Error>));
            let (tx, mut rx) = mpsc::channel(64);
            let recorded = std::sync::Arc::new(std::sync::Mutex::new(None));
            let sink = recorded.clone();
            let wire = Wire::Chat {
                client_wants_usage: wants_usage,
            };
            relay(source, tx, wire, async move |o: StreamOutcome| {
                *sink.lock().unwrap() = Some(o.usage);
                true
            })
            .await;
            let mut body = Vec::new();
            while let Some(Ok(b)) = rx.recv().await {
                body.extend_from_slice(&b);
            }
            let body = String::from_utf8(body).unwrap();
            assert_eq!(body.contains("\"usage\""), wants_usage, "{body}");
            assert!(body.ends_with("data: [DONE]\n\n"));
            assert_eq!(*recorded.lock().unwrap(), Some(Some(Usage::new(3, 2))));
        }
    }

    /// Relays `events`; the body the client got, where a break-off shows as `<broken off: …>`.
    async fn run(wire: Wire, events: &[&str], recorded: bool) -> (String, StreamOutcome) {
        let source = futures::stream::iter(
            events
                .iter()
                .map(|e| Ok::<_, std::io::Error>(Bytes::from(e.to_string()))),
        );
        let (tx, mut rx) = mpsc::channel(64);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let sink = seen.clone();
        relay(source, tx, wire, async move |o: StreamOutcome| {
            *sink.lock().unwrap() = Some(o);
            recorded
        })
        .await;
        let mut body = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                Ok(b) => body.extend_from_slice(&b),
                Err(e) => body.extend_from_slice(format!("<broken off: {e}>").as_bytes()),
            }
        }
        let outcome = seen.lock().unwrap().take().unwrap();
        (String::from_utf8(body).unwrap(), outcome)
    }

    #[tokio::test]
    async fn anthropic_usage_is_merged_and_message_stop_waits_for_the_record() {
        let events = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1,\"cache_read_input_tokens\":100}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":30}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ];
        let (body, outcome) = run(Wire::Anthropic, &events, true).await;
        assert_eq!(body, events.concat(), "relayed unchanged, in order");
        let usage = outcome.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cache_read_tokens
            ),
            (105, 30, 100)
        );
        assert_eq!(outcome.upstream_model.as_deref(), Some("claude-x"));
        // The record could not be written: message_stop is not sent, the stream breaks off.
        let (body, _) = run(Wire::Anthropic, &events, false).await;
        assert!(!body.contains("message_stop"), "{body}");
    }

    #[tokio::test]
    async fn an_error_event_mid_stream_fails_the_call_and_reaches_the_client_as_sent() {
        let anthropic = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        ];
        let responses = [
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-x\"}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null,\"sequence_number\":2}\n\n",
        ];
        let chat = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        ];
        for (wire, events, said) in [
            (
                Wire::Anthropic,
                &anthropic[..],
                "overloaded_error: Overloaded",
            ),
            (Wire::Responses, &responses[..], "server_error: boom"),
            (
                Wire::Chat {
                    client_wants_usage: false,
                },
                &chat[..],
                "overloaded_error: Overloaded",
            ),
        ] {
            let (body, outcome) = run(wire, events, true).await;
            // Nothing is appended after the upstream's own error event, no break-off either.
            assert_eq!(body, events.concat());
            let error = outcome.upstream_error.expect("the call failed");
            assert!(error.ends_with(said), "{error}");
        }
    }

    #[tokio::test]
    async fn responses_usage_comes_from_completed_which_ends_the_stream_without_done() {
        let events = [
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-x\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-x-1\",\"usage\":{\"input_tokens\":50,\"input_tokens_details\":{\"cached_tokens\":20},\"output_tokens\":7,\"output_tokens_details\":{\"reasoning_tokens\":3},\"total_tokens\":57}}}\n\n",
        ];
        let (body, outcome) = run(Wire::Responses, &events, true).await;
        assert_eq!(body, events.concat());
        assert!(!body.contains("[DONE]"));
        let usage = outcome.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.cache_read_tokens,
                usage.completion_tokens,
                usage.reasoning_tokens
            ),
            (50, 20, 7, 3)
        );
        assert_eq!(outcome.upstream_model.as_deref(), Some("gpt-x-1"));
        let (body, _) = run(Wire::Responses, &events, false).await;
        assert!(!body.contains("response.completed"), "{body}");
    }

    #[tokio::test]
    async fn a_failed_response_is_a_failed_call_even_with_usage_and_an_incomplete_one_is_not() {
        let created = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-x\"}}\n\n";
        let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"model\":\"gpt-x-1\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"The model failed\"},\"usage\":{\"input_tokens\":40,\"output_tokens\":9,\"total_tokens\":49}}}\n\n";
        let events = [created, failed];
        let (body, outcome) = run(Wire::Responses, &events, true).await;
        assert_eq!(body, events.concat(), "the client sees the failure as sent");
        let error = outcome
            .upstream_error
            .expect("a failed response fails the call");
        assert!(error.ends_with("server_error: The model failed"), "{error}");

        let incomplete = failed
            .replace("response.failed", "response.incomplete")
            .replace("\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"The model failed\"}", "\"status\":\"incomplete\",\"error\":null");
        let events = [created, incomplete.as_str()];
        let (_, outcome) = run(Wire::Responses, &events, true).await;
        assert_eq!(outcome.upstream_error, None);
        let usage = outcome.usage.expect("an incomplete response is billed");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (40, 9));
    }
}
