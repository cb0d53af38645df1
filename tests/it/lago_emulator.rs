//! The Lago emulator answers every case docs/lago-emulator.md lists ("What it answers") with the
//! exact bodies, and its faults, counters and control endpoints do what they say.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally::lago_emulator::{EmulatorConfig, EmulatorHandle, Fault, StoreKind};

use crate::support::{spawn_lago_emulator, wait_until};

const KEY: &str = "write-key";
const READ_ONLY_KEY: &str = "read-only-key";
const WAIT: Duration = Duration::from_secs(30);

async fn emulator() -> EmulatorHandle {
    emulator_with(StoreKind::Postgres).await
}

async fn emulator_with(store: StoreKind) -> EmulatorHandle {
    spawn_lago_emulator(EmulatorConfig {
        api_key: KEY.to_string(),
        read_only_api_key: Some(READ_ONLY_KEY.to_string()),
        store,
        ..EmulatorConfig::default()
    })
    .await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client")
}

async fn send(
    lago: &EmulatorHandle,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut request = client()
        .post(format!("{}/api/v1/{path}", lago.base_url()))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await
}

/// POST with the write key; returns status and JSON body.
async fn post(lago: &EmulatorHandle, path: &str, body: Value) -> (StatusCode, Value) {
    let response = send(lago, path, Some(KEY), &body.to_string())
        .await
        .expect("the emulator answers");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

async fn get_event(lago: &EmulatorHandle, encoded_id: &str, key: &str) -> (StatusCode, Value) {
    let response = client()
        .get(format!("{}/api/v1/events/{encoded_id}", lago.base_url()))
        .bearer_auth(key)
        .send()
        .await
        .expect("the emulator answers");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

fn event(transaction_id: &str, subscription: &str) -> Value {
    json!({"transaction_id": transaction_id, "external_subscription_id": subscription,
           "code": "llm_usage", "timestamp": 1651240791.123, "properties": {"input_tokens": 7}})
}

fn batch(n: usize, prefix: &str) -> Value {
    json!({"events": (0..n).map(|i| event(&format!("{prefix}-{i}"), "sub-1")).collect::<Vec<_>>()})
}

fn unprocessable(details: Value) -> Value {
    json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
           "error_details": details})
}

fn is_iso_seconds(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z') && !s.contains('.')
}

#[tokio::test]
async fn single_event_answers_200_with_the_event_object() {
    let lago = emulator().await;
    let body = json!({"event": {
        "transaction_id": "tx-1", "external_subscription_id": "sub-1", "code": "llm_usage",
        "timestamp": 1651240791.123, "precise_total_amount_cents": "12.5",
        "properties": {"model": "gpt-4o", "input_tokens": 7, "response_cost": 0.0001675}}});
    let (status, answer) = post(&lago, "events", body).await;
    assert_eq!(status, StatusCode::OK);
    let object = answer["event"].as_object().expect("an event envelope");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "code",
            "created_at",
            "external_subscription_id",
            "lago_customer_id",
            "lago_id",
            "lago_subscription_id",
            "precise_total_amount_cents",
            "properties",
            "timestamp",
            "transaction_id"
        ]
    );
    assert_eq!(object["transaction_id"], "tx-1");
    assert_eq!(object["code"], "llm_usage");
    assert_eq!(object["timestamp"], "2022-04-29T13:59:51.123Z");
    assert_eq!(object["external_subscription_id"], "sub-1");
    assert_eq!(object["lago_customer_id"], Value::Null);
    assert_eq!(object["lago_subscription_id"], Value::Null);
    assert_eq!(object["precise_total_amount_cents"], "12.5");
    assert_eq!(
        object["properties"],
        json!({"model": "gpt-4o", "input_tokens": 7, "response_cost": 0.0001675})
    );
    assert!(is_iso_seconds(object["created_at"].as_str().unwrap()));
    let lago_id = object["lago_id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(lago_id).is_ok());

    let stored = lago.events();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].lago_id, lago_id);
    assert_eq!(stored[0].transaction_id, "tx-1");
    assert_eq!(stored[0].external_subscription_id.as_deref(), Some("sub-1"));
    assert_eq!(stored[0].timestamp_millis, 1_651_240_791_123);
    assert_eq!(
        stored[0].precise_total_amount_cents.as_deref(),
        Some("12.5")
    );
    assert_eq!(stored[0].properties["input_tokens"], 7);
    lago.shutdown().await;
}

#[tokio::test]
async fn batch_answers_200_with_events_in_request_order() {
    let lago = emulator().await;
    let (status, answer) = post(&lago, "events/batch", batch(5, "b")).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = answer["events"]
        .as_array()
        .expect("an events envelope")
        .iter()
        .map(|e| e["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["b-0", "b-1", "b-2", "b-3", "b-4"]);
    let lago_ids: std::collections::HashSet<&str> = answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["lago_id"].as_str().unwrap())
        .collect();
    assert_eq!(lago_ids.len(), 5, "every event gets its own lago_id");
    let stored: Vec<String> = lago
        .events()
        .into_iter()
        .map(|e| e.transaction_id)
        .collect();
    assert_eq!(stored, ["b-0", "b-1", "b-2", "b-3", "b-4"]);
    let counters = lago.counters();
    assert_eq!(counters.batch_requests, 1);
    assert_eq!(counters.events_stored, 5);
    assert_eq!(counters.by_status.get(&200), Some(&1));
    lago.shutdown().await;
}

#[tokio::test]
async fn a_body_without_its_root_key_is_400() {
    let lago = emulator().await;
    let missing = json!({"status": 400,
        "error": "BadRequest: param is missing or the value is empty or invalid: event"});
    for body in [
        json!({"transaction_id": "t", "code": "c"}),
        json!({"event": {}}),
        json!({"event": null}),
    ] {
        assert_eq!(
            post(&lago, "events", body).await,
            (StatusCode::BAD_REQUEST, missing.clone())
        );
    }
    let response = send(&lago, "events", Some(KEY), "{not json").await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": 400, "error": "Bad Request"})
    );
    assert!(lago.events().is_empty());
    lago.shutdown().await;
}

#[tokio::test]
async fn an_empty_or_missing_batch_is_no_events() {
    let lago = emulator().await;
    for body in [
        json!({"events": []}),
        json!({}),
        json!({"events": {"a": 1}}),
    ] {
        assert_eq!(
            post(&lago, "events/batch", body).await,
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                unprocessable(json!({"events": ["no_events"]}))
            )
        );
    }
    lago.shutdown().await;
}

#[tokio::test]
async fn one_hundred_events_pass_and_one_hundred_and_one_do_not() {
    let lago = emulator().await;
    let (status, answer) = post(&lago, "events/batch", batch(100, "ok")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["events"].as_array().unwrap().len(), 100);
    assert_eq!(
        post(&lago, "events/batch", batch(101, "too-many")).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(json!({"events": ["too_many_events"]}))
        )
    );
    assert_eq!(lago.event_count(), 100);
    lago.shutdown().await;
}

#[tokio::test]
async fn the_batch_cap_is_configurable() {
    let lago = spawn_lago_emulator(EmulatorConfig {
        api_key: KEY.to_string(),
        batch_max_length: 3,
        ..EmulatorConfig::default()
    })
    .await;
    assert_eq!(
        post(&lago, "events/batch", batch(3, "a")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        post(&lago, "events/batch", batch(4, "b")).await.1,
        unprocessable(json!({"events": ["too_many_events"]}))
    );
    lago.shutdown().await;
}

#[tokio::test]
async fn a_missing_or_unknown_key_is_401() {
    let lago = emulator().await;
    let unauthorized = json!({"status": 401, "error": "Unauthorized"});
    let body = json!({"event": event("t", "s")}).to_string();
    for key in [None, Some("wrong-key"), Some("")] {
        let response = send(&lago, "events", key, &body).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "key {key:?}");
        assert_eq!(response.json::<Value>().await.unwrap(), unauthorized);
    }
    // Not a bearer token at all.
    let response = client()
        .post(format!("{}/api/v1/events/batch", lago.base_url()))
        .basic_auth("user", Some(KEY))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (status, answer) = get_event(&lago, "t", "wrong-key").await;
    assert_eq!((status, answer), (StatusCode::UNAUTHORIZED, unauthorized));
    assert!(lago.events().is_empty());
    assert_eq!(lago.counters().by_status.get(&401), Some(&5));
    lago.shutdown().await;
}

#[tokio::test]
async fn the_read_only_key_may_read_but_not_write() {
    let lago = emulator().await;
    let forbidden = json!({"status": 403, "error": "Forbidden",
                           "code": "write_action_not_allowed_for_event"});
    for (path, body) in [
        ("events", json!({"event": event("t", "s")})),
        ("events/batch", batch(2, "r")),
    ] {
        let response = send(&lago, path, Some(READ_ONLY_KEY), &body.to_string())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.json::<Value>().await.unwrap(), forbidden);
    }
    assert!(lago.events().is_empty());
    post(&lago, "events", json!({"event": event("t", "s")})).await;
    let (status, answer) = get_event(&lago, "t", READ_ONLY_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["event"]["transaction_id"], "t");
    lago.shutdown().await;
}

#[tokio::test]
async fn an_event_is_found_by_its_url_encoded_transaction_id() {
    let lago = emulator().await;
    let (_, created) = post(&lago, "events", json!({"event": event("tx/ä 1", "sub")})).await;
    let (status, found) = get_event(&lago, "tx%2F%C3%A4%201", KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found, created);
    let (status, missing) = get_event(&lago, "nope", KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing,
        json!({"status": 404, "error": "Not Found", "code": "event_not_found"})
    );
    assert_eq!(lago.counters().get_requests, 2);
    lago.shutdown().await;
}

#[tokio::test]
async fn missing_transaction_id_or_code_is_value_is_mandatory() {
    let lago = emulator().await;
    assert_eq!(
        post(
            &lago,
            "events",
            json!({"event": {"code": "c", "timestamp": 1}})
        )
        .await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(json!({"transaction_id": ["value_is_mandatory"]}))
        )
    );
    assert_eq!(
        post(&lago, "events", json!({"event": {"transaction_id": "t"}}))
            .await
            .1,
        unprocessable(json!({"code": ["value_is_mandatory"]}))
    );
    assert_eq!(
        post(
            &lago,
            "events",
            json!({"event": {"transaction_id": "", "external_subscription_id": "s"}})
        )
        .await
        .1,
        unprocessable(json!({"transaction_id": ["value_is_mandatory"],
                             "code": ["value_is_mandatory"]}))
    );
    assert!(lago.events().is_empty());
    lago.shutdown().await;
}

#[tokio::test]
async fn timestamps_are_unix_seconds_kept_to_the_millisecond() {
    let lago = emulator().await;
    let cases = [
        (
            json!(1651240791),
            1_651_240_791_000_i64,
            "2022-04-29T13:59:51.000Z",
        ),
        (
            json!(1651240791.5),
            1_651_240_791_500,
            "2022-04-29T13:59:51.500Z",
        ),
        (
            json!("1651240791.123"),
            1_651_240_791_123,
            "2022-04-29T13:59:51.123Z",
        ),
        (
            json!("1651240791.1239"),
            1_651_240_791_123,
            "2022-04-29T13:59:51.123Z",
        ),
        (
            json!("1651240791"),
            1_651_240_791_000,
            "2022-04-29T13:59:51.000Z",
        ),
    ];
    for (i, (timestamp, millis, iso)) in cases.iter().enumerate() {
        let mut e = event(&format!("ts-{i}"), "sub");
        e["timestamp"] = timestamp.clone();
        let (status, answer) = post(&lago, "events", json!({ "event": e })).await;
        assert_eq!(status, StatusCode::OK, "{timestamp}");
        assert_eq!(answer["event"]["timestamp"], *iso, "{timestamp}");
        assert_eq!(lago.events()[i].timestamp_millis, *millis, "{timestamp}");
    }
    lago.shutdown().await;
}

#[tokio::test]
async fn an_iso_timestamp_is_invalid_format() {
    let lago = emulator().await;
    for bad in [json!("2022-04-29T13:59:51Z"), json!("soon"), json!(true)] {
        let mut e = event("iso", "sub");
        e["timestamp"] = bad.clone();
        assert_eq!(
            post(&lago, "events", json!({ "event": e })).await,
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                unprocessable(json!({"timestamp": ["invalid_format"]}))
            ),
            "{bad}"
        );
    }
    assert!(lago.events().is_empty());
    lago.shutdown().await;
}

#[tokio::test]
async fn an_omitted_timestamp_is_the_time_of_receipt() {
    let lago = emulator().await;
    let before = chrono::Utc::now().timestamp_millis();
    let (status, _) = post(
        &lago,
        "events",
        json!({"event": {"transaction_id": "now", "code": "c"}}),
    )
    .await;
    let after = chrono::Utc::now().timestamp_millis();
    assert_eq!(status, StatusCode::OK);
    let stored = &lago.events()[0];
    assert!(
        (before..=after).contains(&stored.timestamp_millis),
        "{before} <= {} <= {after}",
        stored.timestamp_millis
    );
    assert_eq!(stored.external_subscription_id, None);
    assert!(stored.properties.is_empty());
    lago.shutdown().await;
}

#[tokio::test]
async fn unknown_fields_are_dropped_silently() {
    let lago = emulator().await;
    let mut e = event("extra", "sub");
    e["external_customer_id"] = json!("cust-1");
    e["surprise"] = json!({"nested": true});
    let (status, answer) = post(&lago, "events", json!({ "event": e })).await;
    assert_eq!(status, StatusCode::OK);
    let object = answer["event"].as_object().unwrap();
    assert!(!object.contains_key("external_customer_id"));
    assert!(!object.contains_key("surprise"));
    let stored = serde_json::to_value(&lago.events()[0]).unwrap();
    assert!(!stored.to_string().contains("cust-1"));
    lago.shutdown().await;
}

#[tokio::test]
async fn a_batch_with_any_invalid_event_stores_nothing_and_names_each_index() {
    let lago = emulator().await;
    let mut bad_time = event("b-1", "sub");
    bad_time["timestamp"] = json!("2022-04-29T13:59:51Z");
    let body = json!({"events": [
        event("b-0", "sub"),
        bad_time,
        {"transaction_id": "b-2", "external_subscription_id": "sub"},
        event("b-3", "sub"),
    ]});
    assert_eq!(
        post(&lago, "events/batch", body).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(json!({"1": {"timestamp": ["invalid_format"]},
                                 "2": {"code": ["value_is_mandatory"]}}))
        )
    );
    assert!(lago.events().is_empty());
    assert_eq!(lago.counters().events_stored, 0);
    lago.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_across_requests_is_value_already_exist() {
    let lago = emulator().await;
    let body = json!({"event": event("dup", "sub-1")});
    assert_eq!(post(&lago, "events", body.clone()).await.0, StatusCode::OK);
    assert_eq!(
        post(&lago, "events", body).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(json!({"transaction_id": ["value_already_exist"]}))
        )
    );
    // Uniqueness is per (external_subscription_id, transaction_id).
    assert_eq!(
        post(&lago, "events", json!({"event": event("dup", "sub-2")}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(lago.event_count(), 2);
    assert_eq!(lago.counters().duplicates, 1);
    lago.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_in_a_batch_rejects_the_batch_and_the_rest_can_be_resent() {
    let lago = emulator().await;
    // Repeated inside one batch: the first is kept, the later one flagged.
    let body = json!({"events": [event("a", "s"), event("b", "s"), event("a", "s")]});
    assert_eq!(
        post(&lago, "events/batch", body).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(json!({"2": {"transaction_id": ["value_already_exist"]}}))
        )
    );
    assert!(lago.events().is_empty());

    // Already stored: flagged by index; nothing else of the batch is stored.
    assert_eq!(
        post(&lago, "events", json!({"event": event("a", "s")}))
            .await
            .0,
        StatusCode::OK
    );
    let body = json!({"events": [event("c", "s"), event("a", "s"), event("d", "s")]});
    assert_eq!(
        post(&lago, "events/batch", body).await.1,
        unprocessable(json!({"1": {"transaction_id": ["value_already_exist"]}}))
    );
    assert_eq!(lago.event_count(), 1);

    // What a shipper does next: resend the unflagged ones.
    let body = json!({"events": [event("c", "s"), event("d", "s")]});
    assert_eq!(post(&lago, "events/batch", body).await.0, StatusCode::OK);
    let stored: Vec<String> = lago
        .events()
        .into_iter()
        .map(|e| e.transaction_id)
        .collect();
    assert_eq!(stored, ["a", "c", "d"]);
    lago.shutdown().await;
}

#[tokio::test]
async fn clickhouse_store_always_answers_200_and_merges_identical_events() {
    let lago = emulator_with(StoreKind::Clickhouse).await;
    let body = json!({"events": [event("x", "s"), event("x", "s")]});
    assert_eq!(post(&lago, "events/batch", body).await.0, StatusCode::OK);
    assert_eq!(
        post(&lago, "events", json!({"event": event("x", "s")}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(lago.event_count(), 1);
    assert_eq!(lago.counters().duplicates, 2);

    // A different timestamp, or none, makes a second billable event.
    let mut later = event("x", "s");
    later["timestamp"] = json!(1651240792);
    assert_eq!(
        post(&lago, "events", json!({ "event": later })).await.0,
        StatusCode::OK
    );
    let untimed = json!({"event": {"transaction_id": "y", "code": "c"}});
    assert_eq!(
        post(&lago, "events", untimed.clone()).await.0,
        StatusCode::OK
    );
    // Receipt times are milliseconds apart at least once the clock moves on.
    let first = lago.events()[2].timestamp_millis;
    wait_until("the clock moves", WAIT, async || {
        chrono::Utc::now().timestamp_millis() > first
    })
    .await;
    assert_eq!(post(&lago, "events", untimed).await.0, StatusCode::OK);
    assert_eq!(lago.event_count(), 4);
    lago.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_served_for_count_requests_then_it_recovers() {
    let lago = emulator().await;
    lago.inject(Fault::ServerError {
        status: 503,
        count: 2,
    });
    for _ in 0..2 {
        let (status, answer) = post(&lago, "events/batch", batch(2, "e")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            answer,
            json!({"status": 503, "error": "Service Unavailable"})
        );
    }
    assert!(lago.events().is_empty());
    assert_eq!(
        post(&lago, "events/batch", batch(2, "e")).await.0,
        StatusCode::OK
    );
    let counters = lago.counters();
    assert_eq!(counters.faults_served, 2);
    assert_eq!(counters.by_status.get(&503), Some(&2));
    assert_eq!(counters.by_status.get(&200), Some(&1));
    assert_eq!(counters.events_stored, 2);
    lago.shutdown().await;
}

#[tokio::test]
async fn rate_limiting_answers_429_with_its_headers() {
    let lago = emulator().await;
    lago.inject(Fault::RateLimit {
        count: 1,
        reset_secs: 7,
        retry_after: true,
    });
    lago.inject(Fault::RateLimit {
        count: 1,
        reset_secs: 3,
        retry_after: false,
    });
    let body = batch(1, "r").to_string();
    let first = send(&lago, "events/batch", Some(KEY), &body).await.unwrap();
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(header(&first, "x-ratelimit-limit").as_deref(), Some("500"));
    assert_eq!(
        header(&first, "x-ratelimit-remaining").as_deref(),
        Some("0")
    );
    assert_eq!(header(&first, "x-ratelimit-reset").as_deref(), Some("7"));
    assert_eq!(header(&first, "retry-after").as_deref(), Some("7"));
    let second = send(&lago, "events/batch", Some(KEY), &body).await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&second, "x-ratelimit-reset").as_deref(), Some("3"));
    assert_eq!(header(&second, "retry-after"), None);
    assert!(lago.events().is_empty());
    let third = send(&lago, "events/batch", Some(KEY), &body).await.unwrap();
    assert_eq!(third.status(), StatusCode::OK);
    lago.shutdown().await;
}

#[tokio::test]
async fn a_delay_holds_the_answer_back() {
    let lago = emulator().await;
    lago.inject(Fault::Delay {
        duration: Duration::from_secs(600),
        count: 1,
    });
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient
        .post(format!("{}/api/v1/events/batch", lago.base_url()))
        .bearer_auth(KEY)
        .json(&batch(1, "slow"))
        .send()
        .await
        .expect_err("the answer is held back far longer than the client waits");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(lago.pending_faults(), 0);
    assert_eq!(
        post(&lago, "events/batch", batch(1, "fast")).await.0,
        StatusCode::OK
    );

    // A short delay still answers, no sooner than asked.
    lago.inject(Fault::Delay {
        duration: Duration::from_millis(200),
        count: 1,
    });
    let started = std::time::Instant::now();
    assert_eq!(
        post(&lago, "events/batch", batch(1, "later")).await.0,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    lago.shutdown().await;
}

#[tokio::test]
async fn a_reset_connection_gets_no_http_answer_and_stores_nothing() {
    let lago = emulator().await;
    lago.inject(Fault::ResetConnection { count: 1 });
    let err = send(&lago, "events/batch", Some(KEY), &batch(3, "z").to_string())
        .await
        .expect_err("no HTTP answer");
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    assert!(lago.events().is_empty());
    assert_eq!(
        post(&lago, "events/batch", batch(3, "z")).await.0,
        StatusCode::OK
    );
    let counters = lago.counters();
    assert_eq!(counters.connections_dropped, 1);
    assert_eq!(counters.requests, 2);
    assert_eq!(counters.by_status.values().sum::<u64>(), 1);
    lago.shutdown().await;
}

#[tokio::test]
async fn a_dropped_response_stores_the_events_but_the_client_never_hears() {
    let lago = emulator().await;
    lago.inject(Fault::DropResponse { count: 1 });
    let body = batch(2, "lost");
    let err = send(&lago, "events/batch", Some(KEY), &body.to_string())
        .await
        .expect_err("no HTTP answer");
    assert!(err.status().is_none(), "{err:?}");
    assert_eq!(lago.event_count(), 2);
    // The resend is what a careful shipper must treat as delivered.
    assert_eq!(
        post(&lago, "events/batch", body).await.1,
        unprocessable(json!({"0": {"transaction_id": ["value_already_exist"]},
                             "1": {"transaction_id": ["value_already_exist"]}}))
    );
    lago.shutdown().await;
}

#[tokio::test]
async fn stop_listening_refuses_connections_until_resumed_on_the_same_port() {
    let lago = emulator().await;
    let port = lago.addr().port();
    let pooled = client();
    let url = format!("{}/api/v1/events/batch", lago.base_url());
    let ok = pooled
        .post(&url)
        .bearer_auth(KEY)
        .json(&batch(1, "before"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);

    lago.stop_listening();
    let err = client()
        .post(&url)
        .bearer_auth(KEY)
        .json(&batch(1, "during"))
        .send()
        .await
        .expect_err("refused");
    assert!(err.is_connect(), "{err:?}");
    // A client with a pooled keep-alive connection is cut off too.
    wait_until("the pooled connection is closed", WAIT, async || {
        let request = pooled.post(&url).bearer_auth(KEY).json(&batch(1, "during"));
        request.send().await.is_err()
    })
    .await;

    lago.resume_listening().await.unwrap();
    assert_eq!(lago.addr().port(), port);
    let ok = pooled
        .post(&url)
        .bearer_auth(KEY)
        .json(&batch(1, "after"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let stored: Vec<String> = lago
        .events()
        .into_iter()
        .map(|e| e.transaction_id)
        .collect();
    assert_eq!(stored, ["before-0", "after-0"]);
    lago.shutdown().await;
}

#[tokio::test]
async fn refuse_connections_listens_again_by_itself() {
    let lago = emulator().await;
    lago.inject(Fault::RefuseConnections {
        duration: Duration::from_millis(300),
    });
    let err = send(&lago, "events/batch", Some(KEY), &batch(1, "r").to_string())
        .await
        .expect_err("refused right after the fault");
    assert!(err.is_connect(), "{err:?}");
    wait_until("the emulator listens again", WAIT, async || {
        send(&lago, "events/batch", Some(KEY), &batch(1, "r").to_string())
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    assert_eq!(lago.event_count(), 1);
    lago.shutdown().await;
}

#[tokio::test]
async fn control_endpoints_read_back_inject_and_reset() {
    let lago = emulator().await;
    let control = |path: &str| format!("{}/_emulator/{path}", lago.base_url());
    let http = client();
    assert_eq!(
        http.get(control("health"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );

    let queued: Value = http
        .post(control("faults"))
        .json(&json!([{"kind": "server_error", "status": 502, "count": 1},
                      {"kind": "rate_limit", "count": 1, "reset_secs": 1}]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queued, json!({"pending_requests": 2}));
    assert_eq!(
        post(&lago, "events/batch", batch(1, "c")).await.0,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        post(&lago, "events/batch", batch(1, "c")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        post(&lago, "events/batch", batch(2, "c")).await.0,
        StatusCode::OK
    );

    let events: Value = http
        .get(control("events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(events.as_array().unwrap().len(), 2);
    assert_eq!(events[1]["transaction_id"], "c-1");
    assert_eq!(events[1]["timestamp_millis"], 1_651_240_791_123_i64);
    let page: Value = http
        .get(control("events?offset=1&limit=5"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["transaction_id"], "c-1");

    let counters: Value = http
        .get(control("counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["requests"], 3);
    assert_eq!(counters["by_status"], json!({"200": 1, "429": 1, "502": 1}));
    assert_eq!(counters["faults_served"], 2);
    assert_eq!(counters["events_stored"], 2);

    http.post(control("faults"))
        .json(&json!({"kind": "reset_connection", "count": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(lago.pending_faults(), 3);
    let cleared = http.delete(control("faults")).send().await.unwrap();
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    assert_eq!(lago.pending_faults(), 0);

    let reset = http.post(control("reset")).send().await.unwrap();
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert!(lago.events().is_empty());
    assert_eq!(lago.counters(), tally::lago_emulator::Counters::default());
    // After a reset, an event sent before is new again.
    assert_eq!(
        post(&lago, "events/batch", batch(2, "c")).await.0,
        StatusCode::OK
    );
    lago.shutdown().await;
}

#[tokio::test]
async fn refuse_connections_over_http_answers_first() {
    let lago = emulator().await;
    let response = client()
        .post(format!("{}/_emulator/faults", lago.base_url()))
        .json(&json!({"kind": "refuse_connections", "duration_ms": 60000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    wait_until("connections are refused", WAIT, async || {
        send(&lago, "events", Some(KEY), "{}")
            .await
            .is_err_and(|e| e.is_connect())
    })
    .await;
    lago.resume_listening().await.unwrap();
    assert_eq!(
        post(&lago, "events", json!({"event": event("back", "s")}))
            .await
            .0,
        StatusCode::OK
    );
    lago.shutdown().await;
}

#[tokio::test]
async fn the_command_serves_until_stopped() {
    use tokio::io::AsyncBufReadExt;

    let mut child = tokio::process::Command::new(crate::support::tally_bin())
        .args(["lago-emulator", "--port", "0", "--api-key", KEY])
        .args(["--store", "clickhouse"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tally runs");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let base_url = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the base URL is printed")
        .unwrap()
        .expect("a line");
    assert!(base_url.starts_with("http://127.0.0.1:"), "{base_url}");
    let http = client();
    for _ in 0..2 {
        let response = http
            .post(format!("{base_url}/api/v1/events"))
            .bearer_auth(KEY)
            .json(&json!({"event": event("cli", "s")}))
            .send()
            .await
            .unwrap();
        // ClickHouse mode: the duplicate is accepted too.
        assert_eq!(response.status(), StatusCode::OK);
    }
    let counters: Value = http
        .get(format!("{base_url}/_emulator/counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["events_stored"], 1);
    assert_eq!(counters["duplicates"], 1);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test]
async fn subscriptions_are_found_by_external_id_or_404_subscription_not_found() {
    let lago = spawn_lago_emulator(EmulatorConfig {
        api_key: KEY.to_string(),
        known_subscriptions: Some(["sub/1".to_string()].into_iter().collect()),
        ..EmulatorConfig::default()
    })
    .await;
    let get = |id: &str| {
        client()
            .get(format!("{}/api/v1/subscriptions/{id}", lago.base_url()))
            .bearer_auth(KEY)
            .send()
    };
    let response = get("sub%2F1").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["subscription"]["external_id"], "sub/1");
    assert_eq!(body["subscription"]["status"], "active");
    let response = get("nobody").await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": 404, "error": "Not Found", "code": "subscription_not_found"})
    );
    let unauthenticated = client()
        .get(format!("{}/api/v1/subscriptions/sub%2F1", lago.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);

    // With none configured, every id is a subscription (the demo and older tests bill).
    let open = emulator().await;
    let response = client()
        .get(format!("{}/api/v1/subscriptions/anyone", open.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn forgotten_events_are_gone_and_can_be_sent_again() {
    let lago = emulator().await;
    let (status, _) = post(
        &lago,
        "events/batch",
        json!({"events": [event("f-1", "s"), event("f-2", "s")]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let forgot: Value = client()
        .post(format!("{}/_emulator/forget", lago.base_url()))
        .json(&json!({"transaction_ids": ["f-1", "never"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(forgot, json!({"forgotten": 1}));
    let (status, body) = get_event(&lago, "f-1", KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "event_not_found");
    assert_eq!(get_event(&lago, "f-2", KEY).await.0, StatusCode::OK);
    // Not a duplicate any more: Lago takes it again.
    let (status, _) = post(&lago, "events", json!({"event": event("f-1", "s")})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lago.event_count(), 2);
}

#[tokio::test]
async fn the_command_sends_signed_events_errors_for_events_no_metric_takes() {
    use tokio::io::AsyncBufReadExt;

    // A receiver that keeps what it gets.
    let got = std::sync::Arc::new(std::sync::Mutex::new(
        Vec::<(Option<String>, Vec<u8>)>::new(),
    ));
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let keep = keep.clone();
                async move {
                    let sig = headers
                        .get("x-lago-signature")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    keep.lock().unwrap().push((sig, body.to_vec()));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut child = tokio::process::Command::new(crate::support::tally_bin())
        .args(["lago-emulator", "--port", "0", "--api-key", KEY])
        .args(["--metric", "llm_usage:input_tokens", "--subscription", "s"])
        .args(["--webhook-url", &hook])
        .env("LAGO_WEBHOOK_HMAC_KEY", "hook-key")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tally runs");
    let stdout = child.stdout.take().unwrap();
    let base_url = tokio::io::BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .unwrap()
        .expect("the base URL");
    let mut bad_code = event("e-code", "s");
    bad_code["code"] = json!("other_metric");
    let mut no_property = event("e-prop", "s");
    no_property["properties"] = json!({"output_tokens": 1});
    let response = client()
        .post(format!("{base_url}/api/v1/events/batch"))
        .bearer_auth(KEY)
        .json(&json!({"events": [event("e-ok", "s"), bad_code, no_property]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    wait_until("the webhook arrives", WAIT, async || {
        !got.lock().unwrap().is_empty()
    })
    .await;
    let (signature, body) = got.lock().unwrap()[0].clone();
    assert_eq!(
        signature.as_deref(),
        Some(tally::ship::webhook::hmac_signature(b"hook-key", &body).as_str())
    );
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["webhook_type"], "events.errors");
    assert_eq!(body["events_errors"]["invalid_code"], json!(["e-code"]));
    assert_eq!(
        body["events_errors"]["missing_aggregation_property"],
        json!(["e-prop"])
    );
    // The configured subscription is known, another is not.
    let unknown = client()
        .get(format!("{base_url}/api/v1/subscriptions/t"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// Not a test: how many events per second the emulator takes in batches of 100 with several
/// requests in flight. Run with
/// `cargo test --release --test it lago_emulator::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test; run on demand"]
async fn throughput_of_batches_of_100() {
    const IN_FLIGHT: usize = 8;
    const BATCHES_PER_TASK: usize = 250;
    let lago = emulator().await;
    let url = format!("{}/api/v1/events/batch", lago.base_url());
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for task in 0..IN_FLIGHT {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let http = client();
            for b in 0..BATCHES_PER_TASK {
                let body = batch(100, &format!("t{task}-b{b}")).to_string();
                let response = http
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                response.bytes().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let events = lago.event_count();
    assert_eq!(events, IN_FLIGHT * BATCHES_PER_TASK * 100);
    println!(
        "{events} events in {elapsed:?}: {:.0} events/s (client and emulator sharing the machine)",
        events as f64 / elapsed.as_secs_f64()
    );
    lago.shutdown().await;
}
