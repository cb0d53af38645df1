//! Hostile input, proxy side (docs/reliability.md, "Findings"): what a client controls is bounded,
//! so every call served is billable; a key's end-user guard; the small refusals (`user: ""`, a
//! non-UTF-8 end-user header, a zero `duration`). The data cases are in
//! `fixtures/bad/proxy_requests.json`.

use std::path::PathBuf;

use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};

use super::{MASTER, Proxy, chat, error_of};

/// `"repeat:N:s"` → `s` N times, so long values stay readable in the fixture.
fn expand(value: Value) -> Value {
    match value {
        Value::String(s) => match s.strip_prefix("repeat:").and_then(|r| r.split_once(':')) {
            Some((n, unit)) => Value::String(unit.repeat(n.parse().unwrap())),
            None => Value::String(s),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(expand).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, expand(v))).collect()),
        other => other,
    }
}

#[tokio::test]
async fn every_bad_request_in_the_fixture_is_refused_by_name_and_nothing_is_billed() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad/proxy_requests.json");
    let cases: Vec<Value> = expand(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap())
        .as_array()
        .cloned()
        .unwrap();
    assert!(cases.len() >= 15);
    let proxy = Proxy::start().await;
    for case in &cases {
        let name = case["case"].as_str().unwrap();
        let route = case["path"].as_str().unwrap();
        let key = match case.get("key") {
            Some(request) => proxy.generate_key(request.clone()).await["key"]
                .as_str()
                .unwrap()
                .to_owned(),
            None => MASTER.to_owned(),
        };
        let mut body = if route == "/chat/completions" {
            chat("gpt-4o")
        } else {
            json!({})
        };
        if let Some(Value::Object(extra)) = case.get("body") {
            body.as_object_mut().unwrap().extend(extra.clone());
        }
        let mut request = proxy.http.post(proxy.url(route)).bearer_auth(&key);
        if let Some(Value::Object(headers)) = case.get("headers") {
            for (h, v) in headers {
                request = request.header(
                    HeaderName::from_bytes(h.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(v.as_str().unwrap().as_bytes()).unwrap(),
                );
            }
        }
        let response = request.json(&body).send().await.unwrap();
        assert_eq!(response.status().as_u16(), case["status"], "{name}");
        let error = error_of(response).await;
        assert_eq!(error["param"], case["param"], "{name}: {error}");
        let message = error["message"].as_str().unwrap();
        for says in case["says"].as_array().unwrap() {
            assert!(
                message.contains(says.as_str().unwrap()),
                "{name}: {message:?} does not say {says}"
            );
        }
    }
    assert!(
        proxy.records().is_empty(),
        "a refused request was written to the spend log"
    );
}

/// The issue's own numbers: a 1 MiB `user` and a 2 MiB `key_alias` (under a body limit that lets
/// them through) are refused, so no record longer than the shipper's line limit is written.
#[tokio::test]
async fn megabyte_identities_are_refused_and_the_largest_allowed_ones_are_billed() {
    let proxy = Proxy::start_with(&[("max_body_bytes", "8388608")]).await;
    let big_alias = proxy
        .post(
            "/key/generate",
            MASTER,
            &json!({"key_alias": "a".repeat(2 << 20)}),
        )
        .await;
    assert_eq!(big_alias.status(), 400);
    let error = error_of(big_alias).await;
    assert_eq!(error["param"], "key_alias");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("2097152 characters long; at most 256"),
        "{error}"
    );

    let mut body = chat("gpt-4o");
    body["user"] = json!("u".repeat(1 << 20));
    let big_user = proxy.post("/chat/completions", MASTER, &body).await;
    assert_eq!(big_user.status(), 400);
    assert_eq!(error_of(big_user).await["param"], "user");
    assert!(proxy.records().is_empty());

    // Every identity at its bound: served, billed, and the line stays small.
    let widest = "😀".repeat(256);
    let key = proxy
        .generate_key(json!({"key_alias": widest, "user_id": widest, "team_id": widest}))
        .await;
    let mut body = chat("gpt-4o");
    body["user"] = json!(widest);
    let served = proxy
        .post("/chat/completions", key["key"].as_str().unwrap(), &body)
        .await;
    assert_eq!(served.status(), 200);
    let records = proxy.wait_records(1).await;
    assert_eq!(records[0].end_user_id.as_deref(), Some(widest.as_str()));
    assert_eq!(records[0].key_alias.as_deref(), Some(widest.as_str()));
    let line_len = proxy.raw_log().len();
    assert!(
        line_len < 16 * 1024,
        "the widest record is {line_len} bytes"
    );
}

#[tokio::test]
async fn a_non_utf8_end_user_header_is_refused_by_name() {
    let proxy = Proxy::start().await;
    let response = proxy
        .http
        .post(proxy.url("/chat/completions"))
        .bearer_auth(MASTER)
        .header(
            "x-litellm-end-user-id",
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["param"], "x-litellm-end-user-id");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not valid UTF-8"),
        "{error}"
    );
    assert!(proxy.records().is_empty());
}

#[tokio::test]
async fn an_empty_user_is_absent_as_openai_treats_it() {
    let proxy = Proxy::start().await;
    let mut body = chat("gpt-4o");
    body["user"] = json!("");
    assert_eq!(
        proxy
            .post("/chat/completions", MASTER, &body)
            .await
            .status(),
        200
    );
    // Absent, so the header names the end user.
    let response = proxy
        .http
        .post(proxy.url("/chat/completions"))
        .bearer_auth(MASTER)
        .header("x-litellm-end-user-id", "from-header")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let records = proxy.wait_records(2).await;
    assert_eq!(records[0].end_user_id, None);
    assert_eq!(records[1].end_user_id.as_deref(), Some("from-header"));
}

#[tokio::test]
async fn a_zero_duration_is_refused_and_a_positive_one_accepted() {
    let proxy = Proxy::start().await;
    for zero in ["0s", "0d", "0w"] {
        let r = proxy
            .post("/key/generate", MASTER, &json!({"duration": zero}))
            .await;
        assert_eq!(r.status(), 400, "{zero}");
        let error = error_of(r).await;
        assert_eq!(error["param"], "duration");
        assert!(
            error["message"].as_str().unwrap().contains("not positive"),
            "{error}"
        );
    }
    let k = proxy.generate_key(json!({"duration": "1s"})).await;
    assert!(k["expires"].is_string());
}

/// A key whose metadata lists the end users it may bill: those are billed; any other is refused
/// with 403 naming the rule and nothing is written to the spend log.
#[tokio::test]
async fn a_keys_end_user_guard_allows_its_ids_and_refuses_others() {
    let proxy = Proxy::start().await;
    let listed = proxy
        .generate_key(json!({"metadata": {"allowed_end_user_ids": ["acme", "globex"]}}))
        .await;
    let listed = listed["key"].as_str().unwrap();
    let prefixed = proxy
        .generate_key(json!({"metadata": {"end_user_id_prefix": "acme-"}}))
        .await;
    let prefixed = prefixed["key"].as_str().unwrap();
    let open = proxy.generate_key(json!({})).await;
    let open = open["key"].as_str().unwrap();

    let call = |key: &str, user: Option<&str>, header: Option<&str>| {
        let mut body = chat("gpt-4o");
        if let Some(u) = user {
            body["user"] = json!(u);
        }
        let mut request = proxy
            .http
            .post(proxy.url("/chat/completions"))
            .bearer_auth(key)
            .json(&body);
        if let Some(h) = header {
            request = request.header("x-litellm-customer-id", h);
        }
        request.send()
    };

    // Refused: nothing billed.
    for (key, user, header, says) in [
        (
            listed,
            Some("initech"),
            None,
            "metadata.allowed_end_user_ids",
        ),
        (
            listed,
            None,
            Some("initech"),
            "metadata.allowed_end_user_ids",
        ),
        (
            prefixed,
            Some("globex-acme-1"),
            None,
            "end_user_id_prefix \"acme-\"",
        ),
        (prefixed, None, None, "names none"),
    ] {
        let r = call(key, user, header).await.unwrap();
        assert_eq!(r.status(), 403, "{user:?} {header:?}");
        let error = error_of(r).await;
        assert_eq!(error["param"], "user");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    assert!(proxy.records().is_empty(), "a refused call was billed");

    // Allowed: billed to the id the call named.
    for (key, user, header) in [
        (listed, Some("acme"), None),
        (listed, None, Some("globex")),
        (prefixed, Some("acme-42"), None),
        (open, Some("anyone-at-all"), None),
    ] {
        let r = call(key, user, header).await.unwrap();
        assert_eq!(r.status(), 200, "{user:?} {header:?}");
    }
    let billed: Vec<_> = proxy
        .wait_records(4)
        .await
        .into_iter()
        .map(|r| r.end_user_id.unwrap())
        .collect();
    assert_eq!(billed, ["acme", "globex", "acme-42", "anyone-at-all"]);
}
