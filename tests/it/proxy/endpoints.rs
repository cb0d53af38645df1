//! Plain (non-streamed) calls, embeddings, models, health, and every error status.

use serde_json::{Value, json};
use tally::spend::Status;

use super::fake_upstream::ANSWER;
use super::{MASTER, Proxy, UPSTREAM_KEY, WAIT, chat, error_of};
use crate::support::wait_until;

#[tokio::test]
async fn chat_completion_is_forwarded_unchanged_and_billed_before_the_response() {
    let proxy = Proxy::start().await;
    let created = proxy
        .generate_key(json!({"team_id": "team-a", "user_id": "user-1", "key_alias": "ci"}))
        .await;
    let key = created["key"].as_str().unwrap();
    let mut body = chat("gpt-4o");
    for (k, v) in [
        ("temperature", json!(0.2)),
        ("top_p", json!(0.9)),
        ("seed", json!(42)),
        ("max_tokens", json!(64)),
        ("response_format", json!({"type": "text"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ),
        ("some_future_param", json!({"nested": [1, 2]})),
        ("user", json!("customer-42")),
    ] {
        body[k] = v;
    }

    let response = proxy.post("/v1/chat/completions", key, &body).await;
    assert_eq!(response.status(), 200);
    let call_id = response.headers()["x-litellm-call-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.headers()["x-litellm-response-cost"], "0.0001675");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], ANSWER);

    // The record is on disk by the time the response arrived: no waiting.
    let records = proxy.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.transaction_id, call_id);
    assert_eq!(
        uuid::Uuid::parse_str(&call_id).unwrap().get_version_num(),
        7
    );
    assert_eq!(r.call_type, "chat_completion");
    assert_eq!(r.model, "gpt-4o");
    assert_eq!(r.upstream_model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(
        (r.input_tokens, r.output_tokens, r.total_tokens),
        (7, 15, Some(22))
    );
    assert_eq!(r.response_cost, Some(0.0001675));
    assert!(!r.usage_estimated);
    assert_eq!(r.end_user_id.as_deref(), Some("customer-42"));
    assert_eq!(r.team_id.as_deref(), Some("team-a"));
    assert_eq!(r.user_id.as_deref(), Some("user-1"));
    assert_eq!(r.key_alias.as_deref(), Some("ci"));
    assert_eq!(r.key_hash.as_deref(), created["token"].as_str());
    assert_eq!((r.stream, r.status.as_str()), (false, "success"));
    assert!(r.start_time.unwrap() <= r.end_time);

    // Every parameter reached the upstream unchanged; only the model was substituted, and the
    // upstream saw its own key, not the client's.
    let sent = proxy.upstream.bodies();
    let mut expected = body.clone();
    expected["model"] = json!("echo");
    assert_eq!(sent, vec![expected]);
    let auth = proxy.upstream.seen.auth.lock().unwrap().clone();
    assert_eq!(auth, vec![Some(format!("Bearer {UPSTREAM_KEY}"))]);

    // No prompt, no completion, no key in the spend log.
    let log = proxy.raw_log();
    for secret in ["capital of France", ANSWER, key, MASTER, UPSTREAM_KEY] {
        assert!(!log.contains(secret), "spend log contains {secret:?}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn identity_comes_from_user_then_headers_and_the_master_key_has_none() {
    let proxy = Proxy::start().await;
    let r = proxy
        .post("/chat/completions", MASTER, &chat("gpt-4o"))
        .await;
    assert_eq!(r.status(), 200);
    for header in ["x-litellm-end-user-id", "x-litellm-customer-id"] {
        let r = proxy
            .http
            .post(proxy.url("/chat/completions"))
            .bearer_auth(MASTER)
            .header(header, format!("from-{header}"))
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let records = proxy.records();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].end_user_id, None);
    assert_eq!(
        records[1].end_user_id.as_deref(),
        Some("from-x-litellm-end-user-id")
    );
    assert_eq!(
        records[2].end_user_id.as_deref(),
        Some("from-x-litellm-customer-id")
    );
    for r in &records {
        assert_eq!(
            (&r.user_id, &r.team_id, &r.key_alias, &r.key_hash),
            (&None, &None, &None, &None)
        );
    }
}

#[tokio::test]
async fn every_key_header_is_accepted() {
    let proxy = Proxy::start().await;
    let key = proxy.generate_key(json!({})).await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for header in ["x-api-key", "api-key", "x-litellm-api-key"] {
        let r = proxy
            .http
            .post(proxy.url("/v1/chat/completions"))
            .header(header, &key)
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{header}");
    }
    assert_eq!(proxy.records().len(), 3);
}

#[tokio::test]
async fn missing_usage_is_estimated_and_flagged() {
    let proxy = Proxy::start().await;
    let r = proxy
        .post("/chat/completions", MASTER, &chat("no-usage"))
        .await;
    assert_eq!(r.status(), 200);
    let rec = &proxy.records()[0];
    assert!(rec.usage_estimated);
    // 31 characters of answer at 4 characters per token, rounded up.
    assert_eq!(rec.output_tokens, 8);
    assert!(rec.input_tokens > 0);
    assert_eq!(rec.response_cost, None, "no-usage has no price");
}

#[tokio::test]
async fn unpriced_models_log_a_null_cost_and_no_cost_header() {
    let proxy = Proxy::start().await;
    let r = proxy
        .post("/chat/completions", MASTER, &chat("my-local"))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-litellm-response-cost").is_none());
    let rec = &proxy.records()[0];
    assert_eq!((rec.input_tokens, rec.response_cost), (7, None));
}

#[tokio::test]
async fn embeddings_on_both_paths() {
    let proxy = Proxy::start().await;
    for path in ["/embeddings", "/v1/embeddings"] {
        let r = proxy
            .post(
                path,
                MASTER,
                &json!({"model": "embed", "input": ["hello", "world"], "user": "c"}),
            )
            .await;
        assert_eq!(r.status(), 200, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["object"], "list");
    }
    let records = proxy.records();
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r.call_type, "embedding");
        assert_eq!((r.input_tokens, r.output_tokens), (5, 0));
        assert_eq!(r.response_cost, Some(0.0000001));
        assert_eq!(r.end_user_id.as_deref(), Some("c"));
    }
    assert_eq!(
        proxy.upstream.bodies()[0]["model"],
        "text-embedding-3-small"
    );
}

#[tokio::test]
async fn mock_models_answer_locally_with_deterministic_usage() {
    let proxy = Proxy::start().await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        let r = proxy.post("/chat/completions", MASTER, &chat("mock")).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "Hello mock world");
        answers.push(body["usage"].clone());
    }
    assert_eq!(answers[0], answers[1]);
    let r = proxy
        .post(
            "/embeddings",
            MASTER,
            &json!({"model": "mock", "input": "abcdefgh"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let records = proxy.records();
    // "Hello mock world" is 16 characters: 4 tokens.
    assert_eq!(records[0].output_tokens, 4);
    assert_eq!(
        records[0].input_tokens,
        answers[0]["prompt_tokens"].as_u64().unwrap()
    );
    let expected = records[0].input_tokens as f64 * 1e-6 + 4.0 * 2e-6;
    assert!((records[0].response_cost.unwrap() - expected).abs() < 1e-12);
    assert_eq!(
        (records[2].call_type.as_str(), records[2].input_tokens),
        ("embedding", 2)
    );
    assert!(
        proxy.upstream.bodies().is_empty(),
        "a mock must not call the network"
    );
}

#[tokio::test]
async fn models_health_and_readiness() {
    let proxy = Proxy::start().await;
    for path in ["/health/liveliness", "/health/liveness"] {
        let r = proxy.http.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} needs no key");
    }
    let r = proxy
        .http
        .get(proxy.url("/health/readiness"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "readiness needs a key");
    let r = proxy
        .http
        .get(proxy.url("/health/readiness"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["spend_log"].as_str(), body["key_store"].as_str()),
        (Some("writable"), Some("open"))
    );

    let ids = |v: Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    for path in ["/models", "/v1/models"] {
        let r = proxy
            .http
            .get(proxy.url(path))
            .bearer_auth(MASTER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let all = ids(r.json().await.unwrap());
        assert_eq!(all.len(), 9);
        assert!(all.contains(&"gpt-4o".to_owned()));
    }
    let key = proxy
        .generate_key(json!({"models": ["mock", "embed"]}))
        .await;
    let r = proxy
        .http
        .get(proxy.url("/v1/models"))
        .bearer_auth(key["key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(ids(r.json().await.unwrap()), vec!["embed", "mock"]);
    let r = proxy
        .http
        .get(proxy.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn client_errors_are_openai_shaped_and_never_billed() {
    let proxy = Proxy::start().await;
    let url = proxy.url("/v1/chat/completions");

    // 401: no key, unknown key.
    let r = proxy
        .http
        .post(&url)
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_of(r).await["type"], "auth_error");
    let r = proxy
        .post(
            "/v1/chat/completions",
            "sk-not-a-real-key-000000000",
            &chat("gpt-4o"),
        )
        .await;
    assert_eq!(r.status(), 401);

    // 400: invalid JSON, not an object, no model, unknown model (listing what exists), no messages.
    let r = proxy
        .http
        .post(&url)
        .bearer_auth(MASTER)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        error_of(r).await["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let r = proxy
        .post("/v1/chat/completions", MASTER, &json!([1]))
        .await;
    assert_eq!(r.status(), 400);
    let r = proxy
        .post("/v1/chat/completions", MASTER, &json!({"messages": []}))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await["param"], "model");
    let r = proxy
        .post("/v1/chat/completions", MASTER, &chat("gpt-5-turbo-max"))
        .await;
    assert_eq!(r.status(), 400);
    let e = error_of(r).await;
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("gpt-5-turbo-max") && message.contains("gpt-4o, no-usage"),
        "{message}"
    );
    assert_eq!(e["code"], "model_not_found");
    let r = proxy
        .post("/v1/chat/completions", MASTER, &json!({"model": "gpt-4o"}))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await["param"], "messages");

    // 403: a key restricted to other models.
    let key = proxy.generate_key(json!({"models": ["mock"]})).await;
    let r = proxy
        .post(
            "/v1/chat/completions",
            key["key"].as_str().unwrap(),
            &chat("gpt-4o"),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert!(
        error_of(r).await["message"]
            .as_str()
            .unwrap()
            .contains("mock")
    );

    // 413: over tally_settings.max_body_bytes (64 KiB), with and without a length header.
    let mut big = chat("gpt-4o");
    big["messages"][0]["content"] = json!("x".repeat(70_000));
    let r = proxy.post("/v1/chat/completions", MASTER, &big).await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_of(r).await["code"], "request_too_large");
    let chunks = futures::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 4096]))),
    );
    let r = proxy
        .http
        .post(&url)
        .bearer_auth(MASTER)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // 415: not JSON.
    let r = proxy
        .http
        .post(&url)
        .bearer_auth(MASTER)
        .header("content-type", "text/plain")
        .body(chat("gpt-4o").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    error_of(r).await;

    assert!(
        proxy.records().is_empty(),
        "client errors must not be logged as calls"
    );
    assert!(proxy.upstream.bodies().is_empty());
}

#[tokio::test]
async fn upstream_failures_map_to_502_504_or_pass_through_and_are_not_billed() {
    let proxy = Proxy::start().await;

    let r = proxy
        .post("/v1/chat/completions", MASTER, &chat("down"))
        .await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_of(r).await["code"], "upstream_unreachable");

    let r = proxy
        .post("/v1/chat/completions", MASTER, &chat("slow"))
        .await;
    assert_eq!(r.status(), 504);
    assert_eq!(error_of(r).await["code"], "upstream_timeout");

    let r = proxy
        .post("/v1/chat/completions", MASTER, &chat("rate-limited"))
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#
    );

    let records = proxy.records();
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(r.status, Status::Failure);
        assert!(!r.is_billable());
        assert_eq!(
            (r.input_tokens, r.output_tokens, r.response_cost),
            (0, 0, None)
        );
    }
    assert_eq!(
        records.iter().map(|r| r.model.as_str()).collect::<Vec<_>>(),
        ["down", "slow", "rate-limited"]
    );
}

#[tokio::test]
async fn shutdown_flushes_and_serve_returns() {
    let proxy = Proxy::start().await;
    for _ in 0..5 {
        assert_eq!(
            proxy
                .post("/chat/completions", MASTER, &chat("mock"))
                .await
                .status(),
            200
        );
    }
    let records = proxy.stop().await;
    assert_eq!(records.len(), 5);
    let ids: std::collections::HashSet<_> = records.iter().map(|r| &r.transaction_id).collect();
    assert_eq!(ids.len(), 5, "transaction ids are unique");
}

#[tokio::test]
async fn the_binary_refuses_a_weak_master_key_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "model_list:\n  - model_name: m\n    litellm_params: {model: openai/m, mock_response: hi}\ngeneral_settings:\n  master_key: sk-1234\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::tally_bin())
        .args(["proxy", "--port", "0", "--config"])
        .arg(&config)
        .env_remove("LITELLM_MASTER_KEY")
        .env_remove("TALLY_ALLOW_WEAK_MASTER_KEY")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("weak") && stderr.contains("openssl rand -hex 24"),
        "{stderr}"
    );

    std::fs::write(
        &config,
        "model_list:\n  - model_name: m\n    litellm_params: {model: vertex_ai/m}\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::tally_bin())
        .args(["proxy", "--port", "0", "--config"])
        .arg(&config)
        .env("LITELLM_MASTER_KEY", MASTER)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("model_list[0] (model_name \"m\")") && stderr.contains("openai/"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_client_that_hangs_up_on_a_plain_call_is_still_recorded() {
    let proxy = Proxy::start().await;
    let http = proxy.http.clone();
    let url = proxy.url("/chat/completions");
    let request = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(MASTER)
            .json(&chat("gated"))
            .send()
            .await
    });
    wait_until("the upstream to receive the call", WAIT, async || {
        (!proxy.upstream.bodies().is_empty()).then_some(())
    })
    .await;
    request.abort(); // the client hangs up while the upstream is still working
    let _ = request.await;
    proxy.upstream.seen.gate.notify_one();
    let records = proxy.wait_records(1).await;
    assert_eq!(records[0].status, Status::Success);
    assert_eq!((records[0].input_tokens, records[0].output_tokens), (7, 15));
}

/// A client that is still sending when the proxy refuses its body (413 over the size limit, 415
/// not JSON) must get the answer, not a reset: the proxy reads the refused body before it
/// answers. Sent as a raw HTTP/1.1 request whose body follows its headers after a pause, so a
/// proxy that answered and closed at once would have its socket reset by the body's arrival.
#[tokio::test]
async fn a_refused_body_still_sent_by_the_client_gets_its_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = Proxy::start().await;
    let addr = proxy.base.trim_start_matches("http://").to_owned();
    for (content_type, size, want) in [
        ("application/json", 80 << 10, "413"),
        ("text/plain", 32 << 10, "415"),
    ] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {MASTER}\r\n\
             content-type: {content_type}\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // The proxy may close once it has answered; a write error here is not the failure.
        let _ = conn.write_all(&vec![b' '; size]).await;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)
            .await
            .unwrap_or_else(|e| panic!("{want}: the connection broke before the answer: {e}"));
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {want}")),
            "{want}: {text}"
        );
        assert!(
            text.contains("\"error\""),
            "{want}: not OpenAI-shaped: {text}"
        );
    }
}
