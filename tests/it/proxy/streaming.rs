//! `stream: true`: chunks forwarded as they arrive, usage requested upstream and stripped unless
//! asked for, the record written before `[DONE]`, and client disconnects still recorded.

use futures::StreamExt;
use serde_json::{Value, json};
use tally::spend::Status;

use super::fake_upstream::ANSWER;
use super::{MASTER, Proxy, chat};

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn text_of(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn streams_strip_the_usage_chunk_unless_asked_and_record_before_done() {
    let proxy = Proxy::start().await;
    let key = proxy.generate_key(json!({"team_id": "team-s"})).await;
    let key = key["key"].as_str().unwrap();
    for (asks_usage, path) in [(false, "/v1/chat/completions"), (true, "/chat/completions")] {
        let mut body = chat("gpt-4o");
        body["stream"] = json!(true);
        body["user"] = json!("streamer");
        if asks_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let r = proxy.post(path, key, &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let call_id = r.headers()["x-litellm-call-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let text = r.text().await.unwrap();
        let events = events(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        assert_eq!(text_of(&events), ANSWER);
        let usage_chunks = events.iter().filter(|e| e.contains("\"usage\"")).count();
        assert_eq!(usage_chunks, usize::from(asks_usage), "{text}");

        // Written before [DONE] was sent: present as soon as the body ended.
        let records = proxy.records();
        let r = records.last().unwrap();
        assert_eq!(r.transaction_id, call_id);
        assert!(r.stream);
        assert_eq!((r.input_tokens, r.output_tokens), (7, 15));
        assert_eq!(r.response_cost, Some(0.0001675));
        assert!(!r.usage_estimated);
        assert_eq!(r.team_id.as_deref(), Some("team-s"));
        assert_eq!(r.end_user_id.as_deref(), Some("streamer"));
    }
    // tally always asked the upstream for usage, and passed the other fields through.
    for sent in proxy.upstream.bodies() {
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["model"], "echo");
        assert_eq!(sent["user"], "streamer");
    }
    assert_eq!(proxy.records().len(), 2);
}

#[tokio::test]
async fn a_stream_without_upstream_usage_is_estimated() {
    let proxy = Proxy::start().await;
    let mut body = chat("no-usage");
    body["stream"] = json!(true);
    let text = proxy
        .post("/chat/completions", MASTER, &body)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(text_of(&events(&text)), ANSWER);
    let r = &proxy.records()[0];
    assert!(r.usage_estimated && r.stream);
    assert_eq!(r.output_tokens, 8);
}

#[tokio::test]
async fn chunks_are_forwarded_before_the_upstream_finishes() {
    let proxy = Proxy::start().await;
    let mut body = chat("gated");
    body["stream"] = json!(true);
    let r = proxy.post("/chat/completions", MASTER, &body).await;
    let mut stream = r.bytes_stream();
    // The upstream holds everything after its first chunk until the gate opens: receiving that
    // chunk now proves the proxy does not buffer the answer.
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"role\":\"assistant\""));
    assert!(
        proxy.records().is_empty(),
        "nothing is recorded before the upstream ends"
    );
    proxy.upstream.seen.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"));
    assert_eq!(proxy.records().len(), 1);
}

#[tokio::test]
async fn a_client_disconnect_mid_stream_still_records_the_tokens() {
    let proxy = Proxy::start().await;
    let key = proxy.generate_key(json!({"user_id": "leaver"})).await;
    let mut body = chat("gated");
    body["stream"] = json!(true);
    let r = proxy
        .post("/chat/completions", key["key"].as_str().unwrap(), &body)
        .await;
    let call_id = r.headers()["x-litellm-call-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream); // the client goes away mid-answer
    proxy.upstream.seen.gate.notify_one();

    let records = proxy.wait_records(1).await;
    let r = &records[0];
    assert_eq!(r.transaction_id, call_id);
    assert_eq!(r.status, Status::Success);
    // The proxy read the upstream to its end, so the usage is the upstream's own, not a guess.
    assert_eq!(
        (r.input_tokens, r.output_tokens, r.usage_estimated),
        (7, 15, false)
    );
    assert!((r.response_cost.unwrap() - (7.0 * 0.000001 + 15.0 * 0.000002)).abs() < 1e-12);
    assert_eq!(r.user_id.as_deref(), Some("leaver"));
}

#[tokio::test]
async fn mock_models_stream_too() {
    let proxy = Proxy::start().await;
    let mut body = chat("mock");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = proxy
        .post("/v1/chat/completions", MASTER, &body)
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(text_of(&events), "Hello mock world");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    let r = &proxy.records()[0];
    assert_eq!(usage["usage"]["completion_tokens"], r.output_tokens);
    assert_eq!(usage["usage"]["prompt_tokens"], r.input_tokens);
    assert!(r.stream && !r.usage_estimated);
    assert!(proxy.upstream.bodies().is_empty());
}
