//! `tally audit`, Lago's `events.errors` webhooks and unknown subscriptions, end to end: the real
//! binary, a real outbox, and the Lago emulator (docs/operations.md, "Knowing that Lago bills it").

use std::collections::HashSet;

use serde_json::Value;
use tally::lago_emulator::{EmulatorConfig, Metric, WebhookConfig};
use tally::ship::webhook::hmac_signature;

use super::{Bench, GENEROUS, u, write};
use crate::commands::replay::stop;
use crate::support::{SpendLine, free_port, wait_until};

const HMAC_KEY: &str = "whsec-test-key";

fn lines(ids: &[(&str, &str)]) -> Vec<String> {
    ids.iter()
        .enumerate()
        .map(|(i, (id, who))| {
            SpendLine::new(*id)
                .end_time(&format!("2026-11-27T10:00:0{i}.250Z"))
                .end_user(*who)
                .team("team-x")
                .tokens(7, 15)
                .cost(0.0002)
                .to_line()
        })
        .collect()
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    let mut ids: Vec<String> = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_what_lago_lost_fixes_it_and_then_passes() {
    let b = Bench::new().await;
    write(
        &b.path("spend.jsonl"),
        &lines(&[
            ("a-1", "c-1"),
            ("a-2", "c-1"),
            ("a-3", "c-2"),
            ("a/4?x#y", "c-2"),
        ]),
    );
    let mut ship = b
        .command(&["ship", "--poll-interval-ms", "50", "--linger-ms", "5"])
        .spawn()
        .unwrap();
    wait_until("tally ship delivers the log", GENEROUS, async || {
        b.lago.event_count() == 4
    })
    .await;
    wait_until("every event acked", GENEROUS, async || {
        u(&b.json(&["queue", "stats"]).await, "acked") == 4
    })
    .await;

    // All there: exit 0. An id with `/`, `?` and `#` is looked up URL-encoded.
    let run = b.run(&["audit", "--output-format", "json"]).await;
    run.assert_code(0);
    let v = run.json();
    assert_eq!(
        (u(&v, "checked"), u(&v, "missing"), u(&v, "different")),
        (4, 0, 0),
        "{v}"
    );

    // Lago loses two events.
    assert_eq!(b.lago.forget(&["a-2", "a/4?x#y"]), 2);
    let run = b.run(&["audit", "--output-format", "json"]).await;
    run.assert_code(3);
    let v = run.json();
    assert_eq!((u(&v, "checked"), u(&v, "missing")), (4, 2), "{v}");
    assert_eq!(ids(&v, "missing_ids"), ["a-2", "a/4?x#y"]);
    assert!(
        v["requeued"].as_array().unwrap().is_empty(),
        "no --fix, nothing requeued: {v}"
    );

    // --fix requeues exactly the missing ones; the running shipper sends them again.
    let run = b.run(&["audit", "--fix", "--output-format", "json"]).await;
    run.assert_code(3);
    let v = run.json();
    assert_eq!(ids(&v, "requeued"), ["a-2", "a/4?x#y"], "{v}");
    wait_until(
        "the shipper resends the requeued events",
        GENEROUS,
        async || b.lago.event_count() == 4,
    )
    .await;
    wait_until("the resent events are acked", GENEROUS, async || {
        let s = b.json(&["queue", "stats"]).await;
        u(&s, "acked") == 4 && u(&s, "pending") == 0
    })
    .await;
    // Sent again as they were: same code, subscription and timestamp.
    let resent = b
        .lago
        .events()
        .into_iter()
        .find(|e| e.transaction_id == "a-2")
        .unwrap();
    assert_eq!(resent.external_subscription_id.as_deref(), Some("c-1"));
    assert_eq!(resent.code, super::EVENT_CODE);
    assert_eq!(resent.properties["total_tokens"], 22);

    let run = b.run(&["audit"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("All is well"), "{}", run.stdout);
    stop(&mut ship).await;
}

/// `--fix` rebuilds a lost event as the shipper sent it: with `TALLY_PRECISE_AMOUNT`, its
/// amount too (the ack does not keep the event's JSON).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_fix_resends_the_precise_amount_the_shipper_sent() {
    let b = Bench::new().await;
    write(
        &b.path("spend.jsonl"),
        &lines(&[("p-1", "c-1"), ("p-2", "c-1")]),
    );
    let precise = ["--precise-amount", "--cost-markup", "1.5"];
    let mut args = vec!["ship", "--poll-interval-ms", "50", "--linger-ms", "5"];
    args.extend(precise);
    let mut ship = b.command(&args).spawn().unwrap();
    wait_until("tally ship delivers the log", GENEROUS, async || {
        b.lago.event_count() == 2
    })
    .await;
    wait_until("every event acked", GENEROUS, async || {
        u(&b.json(&["queue", "stats"]).await, "acked") == 2
    })
    .await;
    let amount = |id: &str| {
        b.lago
            .events()
            .into_iter()
            .find(|e| e.transaction_id == id)
            .and_then(|e| e.precise_total_amount_cents)
    };
    // 0.0002 USD x 100 x 1.5
    assert_eq!(amount("p-1").as_deref(), Some("0.03"));
    assert_eq!(b.lago.forget(&["p-1"]), 1);
    let mut fix = vec!["audit", "--fix", "--output-format", "json"];
    fix.extend(precise);
    let run = b.run(&fix).await;
    run.assert_code(3);
    assert_eq!(ids(&run.json(), "requeued"), ["p-1"]);
    wait_until("the shipper resends p-1", GENEROUS, async || {
        b.lago.event_count() == 2
    })
    .await;
    assert_eq!(amount("p-1").as_deref(), Some("0.03"));
    stop(&mut ship).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_subscriptions_lago_does_not_know() {
    let b = Bench::with_lago(EmulatorConfig {
        known_subscriptions: Some(HashSet::from(["c-1".to_owned()])),
        ..EmulatorConfig::default()
    })
    .await;
    let log = b.path("old.jsonl");
    write(
        &log,
        &lines(&[("s-1", "c-1"), ("s-2", "ghost"), ("s-3", "ghost")]),
    );
    b.run(&["replay", log.to_str().unwrap(), "--ship"])
        .await
        .assert_code(0);
    let run = b.run(&["audit", "--output-format", "json"]).await;
    run.assert_code(3);
    let v = run.json();
    assert_eq!((u(&v, "checked"), u(&v, "missing")), (3, 0), "{v}");
    assert_eq!(
        v["unknown_subscriptions"],
        serde_json::json!({"ghost": 2}),
        "{v}"
    );

    // `tally queue stats` shows it too.
    let stats = b.json(&["queue", "stats"]).await;
    assert_eq!(
        stats["unknown_subscriptions"],
        serde_json::json!(["ghost"]),
        "{stats}"
    );
    let text = b.run(&["queue", "stats"]).await;
    assert!(
        text.stdout.contains("Unknown subscriptions"),
        "{}",
        text.stdout
    );

    // --sample checks at most that many.
    let run = b
        .run(&["audit", "--sample", "1", "--output-format", "json"])
        .await;
    assert_eq!(u(&run.json(), "checked"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_an_event_lago_holds_in_another_form_and_does_not_fix_it() {
    let b = Bench::new().await;
    // Another sender used the same transaction_id first (Postgres keeps one per subscription,
    // and the lookup returns the first).
    let foreign = serde_json::json!({"event": {"transaction_id": "d-1", "code": "other_metric",
        "external_subscription_id": "someone-else", "timestamp": 1_700_000_000, "properties": {}}});
    let status = reqwest::Client::new()
        .post(format!("{}/api/v1/events", b.lago.base_url()))
        .bearer_auth(EmulatorConfig::default().api_key)
        .json(&foreign)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let log = b.path("old.jsonl");
    write(&log, &lines(&[("d-1", "c-1"), ("d-2", "c-1")]));
    b.run(&["replay", log.to_str().unwrap(), "--ship"])
        .await
        .assert_code(0);
    let run = b.run(&["audit", "--fix", "--output-format", "json"]).await;
    run.assert_code(3);
    let v = run.json();
    assert_eq!(
        (u(&v, "checked"), u(&v, "missing"), u(&v, "different")),
        (2, 0, 1),
        "{v}"
    );
    let d = &v["different_events"][0];
    assert_eq!(d["transaction_id"], "d-1");
    let detail = d["detail"].as_str().unwrap();
    for part in ["code: sent \"llm_usage\"", "someone-else", "timestamp"] {
        assert!(detail.contains(part), "{part} in {detail}");
    }
    // --fix never touches an event Lago has.
    assert!(v["requeued"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(u(&b.json(&["queue", "stats"]).await, "pending"), 0);
}

/// Posts `body` to the shipper's webhook endpoint with `headers`; returns the status.
async fn post(url: &str, body: &[u8], headers: &[(&str, String)]) -> u16 {
    let mut req = reqwest::Client::new().post(url).body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_errors_webhooks_move_events_to_lago_error() {
    let webhook_port = free_port();
    let metrics_port = free_port();
    let url = format!("http://127.0.0.1:{webhook_port}/lago/webhooks");
    // Lago's only metric is another code: every event is `invalid_code`.
    let b = Bench::with_lago(EmulatorConfig {
        metrics: vec!["llm_tokens:total_tokens".parse::<Metric>().unwrap()],
        webhook: Some(WebhookConfig {
            url: url.clone(),
            hmac_key: Some(HMAC_KEY.into()),
            jwt: false,
        }),
        ..EmulatorConfig::default()
    })
    .await;
    let webhook_addr = format!("127.0.0.1:{webhook_port}");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut cmd = b.command(&[
        "ship",
        "--poll-interval-ms",
        "50",
        "--linger-ms",
        "5",
        "--webhook-addr",
        &webhook_addr,
        "--metrics-addr",
        &metrics_addr,
    ]);
    cmd.env("LAGO_WEBHOOK_HMAC_KEY", HMAC_KEY);
    // The webhook listener must be up before the first event is sent: start with an empty log.
    write(&b.path("spend.jsonl"), &[]);
    let mut ship = cmd.spawn().unwrap();
    wait_until("the webhook listener is up", GENEROUS, async || {
        reqwest::Client::new().post(&url).send().await.is_ok()
    })
    .await;

    // Signatures: none, wrong, right; too large; unused type; duplicate.
    let unused = br#"{"webhook_type":"invoice.created","object_type":"invoice","invoice":{}}"#;
    let good = |body: &[u8]| {
        vec![
            ("x-lago-signature-algorithm", "hmac".to_owned()),
            (
                "x-lago-signature",
                hmac_signature(HMAC_KEY.as_bytes(), body),
            ),
            ("x-lago-unique-key", format!("k-{}", body.len())),
        ]
    };
    assert_eq!(post(&url, unused, &[]).await, 401, "unsigned");
    assert_eq!(
        post(
            &url,
            unused,
            &[
                ("x-lago-signature-algorithm", "hmac".to_owned()),
                ("x-lago-signature", hmac_signature(b"another key", unused)),
            ]
        )
        .await,
        401,
        "wrongly signed"
    );
    assert_eq!(
        post(&url, unused, &good(unused)).await,
        200,
        "unused type, signed"
    );
    let huge = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(post(&url, &huge, &good(&huge)).await, 413);

    // Events reach Lago; the emulator reports them in a signed events.errors webhook.
    let mut log = lines(&[("w-1", "c-1"), ("w-2", "c-2")]);
    log.push(String::new());
    write(&b.path("spend.jsonl"), &log);
    wait_until(
        "Lago's events.errors moves both events to lago-error",
        GENEROUS,
        async || u(&b.json(&["queue", "stats"]).await, "lago_error") == 2,
    )
    .await;
    let list = b.json(&["queue", "list", "--state", "lago-error"]).await;
    let items = list["items"].as_array().unwrap_or_else(|| panic!("{list}"));
    assert_eq!(items.len(), 2, "{list}");
    for item in items {
        assert_eq!(item["reason"], "invalid_code", "{item}");
        assert_eq!(item["state"], "lago_error", "{item}");
    }
    let text = b.run(&["queue", "stats"]).await;
    assert!(text.stdout.contains("lago error"), "{}", text.stdout);

    // A repeated delivery (same unique key) and ids tally never sent change nothing.
    let body = br#"{"webhook_type":"events.errors","object_type":"events_errors","events_errors":{"invalid_code":["w-1","never-sent"],"missing_aggregation_property":[],"invalid_filter_values":[]}}"#;
    assert_eq!(post(&url, body, &good(body)).await, 200);
    assert_eq!(post(&url, body, &good(body)).await, 200);

    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"tally_ship_lago_error_events_total{category="invalid_code"} 2"#),
        "{metrics}"
    );
    assert_eq!(u(&b.json(&["queue", "stats"]).await, "lago_error"), 2);
    stop(&mut ship).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipper_warns_once_about_a_subscription_lago_does_not_know_and_keeps_sending() {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let b = Bench::with_lago(EmulatorConfig {
        known_subscriptions: Some(HashSet::from(["c-1".to_owned()])),
        ..EmulatorConfig::default()
    })
    .await;
    write(
        &b.path("spend.jsonl"),
        &lines(&[("u-1", "c-1"), ("u-2", "ghost"), ("u-3", "ghost")]),
    );
    let ship = b
        .command(&[
            "ship",
            "--poll-interval-ms",
            "50",
            "--linger-ms",
            "5",
            "--metrics-addr",
            &metrics_addr,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "queue stats names the unknown subscription",
        GENEROUS,
        async || {
            let run = b.run(&["queue", "stats", "--output-format", "json"]).await;
            run.code == Some(0)
                && run.json()["unknown_subscriptions"] == serde_json::json!(["ghost"])
        },
    )
    .await;
    // Still sent: the subscription may be created later.
    wait_until("every event delivered", GENEROUS, async || {
        b.lago.event_count() == 3
    })
    .await;
    // The gauge is set after the outbox row that `queue stats` reads: polled, not read once.
    wait_until(
        "the unknown-subscriptions gauge reads 1",
        GENEROUS,
        async || {
            let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics.contains("tally_ship_unknown_subscriptions 1")
        },
    )
    .await;
    // More events for the same subscription: no second warning.
    let mut more = lines(&[("u-1", "c-1"), ("u-2", "ghost"), ("u-3", "ghost")]);
    more.extend(
        lines(&[("u-4", "ghost")])
            .into_iter()
            .map(|l| l.replace("10:00:00", "10:00:09")),
    );
    write(&b.path("spend.jsonl"), &more);
    wait_until("the next event delivered", GENEROUS, async || {
        b.lago.event_count() == 4
    })
    .await;
    // Two scan periods pass with the new row in the outbox.
    tokio::time::sleep(tally::ship::subscriptions::SCAN_EVERY * 2).await;
    let pid = ship.id().unwrap() as libc::pid_t;
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = tokio::time::timeout(GENEROUS, ship.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .matches("Lago does not know this subscription")
            .count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("ghost"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_waits_out_429_and_resumes_where_it_was_interrupted() {
    let b = Bench::new().await;
    let log = b.path("old.jsonl");
    write(
        &log,
        &lines(&[
            ("r-1", "c-1"),
            ("r-2", "c-1"),
            ("r-3", "c-1"),
            ("r-4", "c-1"),
        ]),
    );
    b.run(&["replay", log.to_str().unwrap(), "--ship"])
        .await
        .assert_code(0);

    // Lago Cloud's 429: waited out (X-RateLimit-Reset), then the same lookup again.
    b.lago.inject(tally::lago_emulator::Fault::RateLimit {
        count: 2,
        reset_secs: 1,
        retry_after: false,
    });
    let run = b.run(&["audit", "--output-format", "json"]).await;
    run.assert_code(0);
    let v = run.json();
    assert_eq!((u(&v, "checked"), u(&v, "rate_limited")), (4, 2), "{v}");

    // Interrupted after a lookup or two (1 request/s), it resumes instead of starting over.
    let gets = || b.lago.counters().get_requests;
    let before = gets();
    let child = b
        .command(&["audit", "--rate", "1", "--output-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the audit has looked up two events", GENEROUS, async || {
        gets() >= before + 2
    })
    .await;
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = b
        .run(&["audit", "--rate", "50", "--output-format", "json"])
        .await;
    run.assert_code(0);
    let v = run.json();
    assert_eq!(v["resumed"], true, "{v}");
    assert_eq!(u(&v, "checked"), 4, "{v}");
    // At most the one lookup in flight at the interruption is made twice.
    assert!(
        gets() - before <= 5,
        "{} lookups for 4 events",
        gets() - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_signed_webhooks_are_checked_with_lagos_public_key() {
    let webhook_port = free_port();
    let url = format!("http://127.0.0.1:{webhook_port}/lago/webhooks");
    // No HMAC key: the emulator signs `jwt`, as Lago does by default; the events lack the
    // metric's aggregation property.
    let b = Bench::with_lago(EmulatorConfig {
        metrics: vec!["llm_usage:cached_tokens".parse::<Metric>().unwrap()],
        webhook: Some(WebhookConfig {
            url: url.clone(),
            hmac_key: None,
            jwt: true,
        }),
        ..EmulatorConfig::default()
    })
    .await;
    let webhook_addr = format!("127.0.0.1:{webhook_port}");
    write(&b.path("spend.jsonl"), &[]);
    let mut ship = b
        .command(&[
            "ship",
            "--poll-interval-ms",
            "50",
            "--linger-ms",
            "5",
            "--webhook-addr",
            &webhook_addr,
        ])
        // Empty: must not let anyone sign hmac with the empty key.
        .env("LAGO_WEBHOOK_HMAC_KEY", "")
        .spawn()
        .unwrap();
    wait_until("the webhook listener is up", GENEROUS, async || {
        reqwest::Client::new().post(&url).send().await.is_ok()
    })
    .await;
    let body = br#"{"webhook_type":"events.errors","object_type":"events_errors","events_errors":{"invalid_code":["j-1"]}}"#;
    let jwt = |token: &str| {
        vec![
            ("x-lago-signature-algorithm", "jwt".to_owned()),
            ("x-lago-signature", token.to_owned()),
        ]
    };
    // Not a JWT, and a JWT signed with a shared secret instead of Lago's RSA key.
    assert_eq!(post(&url, body, &jwt("not.a.jwt")).await, 401);
    let hs256 = "eyJhbGciOiJIUzI1NiJ9.eyJkYXRhIjoie30ifQ.c2lnbmF0dXJl";
    assert_eq!(post(&url, body, &jwt(hs256)).await, 401);
    // An hmac-signed one while no HMAC key is configured.
    assert_eq!(
        post(
            &url,
            body,
            &[
                ("x-lago-signature-algorithm", "hmac".to_owned()),
                ("x-lago-signature", hmac_signature(b"k", body)),
            ]
        )
        .await,
        401
    );

    write(
        &b.path("spend.jsonl"),
        &lines(&[("j-1", "c-1"), ("j-2", "c-1")]),
    );
    wait_until(
        "the jwt-signed events.errors is accepted",
        GENEROUS,
        async || u(&b.json(&["queue", "stats"]).await, "lago_error") == 2,
    )
    .await;
    let list = b.json(&["queue", "list", "--state", "lago-error"]).await;
    for item in list["items"].as_array().unwrap() {
        assert_eq!(item["reason"], "missing_aggregation_property", "{item}");
    }
    stop(&mut ship).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_refuses_bad_options_with_what_to_do() {
    let b = Bench::new().await;
    let run = b.run(&["audit"]).await;
    run.assert_code(1);
    assert!(run.stderr.contains("no outbox at"), "{}", run.stderr);
    let log = b.path("old.jsonl");
    write(&log, &lines(&[("b-1", "c-1")]));
    b.run(&["replay", log.to_str().unwrap(), "--ship"])
        .await
        .assert_code(0);
    let run = b.run(&["audit", "--rate", "0"]).await;
    run.assert_code(1);
    assert!(
        run.stderr.contains("--rate 0 is not a request rate"),
        "{}",
        run.stderr
    );
    let run = b.run(&["audit", "--since", "yesterday-ish"]).await;
    run.assert_code(1);
    assert!(run.stderr.contains("--since"), "{}", run.stderr);
    let run = b
        .command(&["audit"])
        .env_remove("LAGO_API_KEY")
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("LAGO_API_KEY is not set"));
    // A wrong key is Lago's 401, said plainly, and the key is not echoed.
    let run = b
        .command(&["audit"])
        .env("LAGO_API_KEY", "wrong-key-123")
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("refused the API key"), "{stderr}");
    assert!(!stderr.contains("wrong-key-123"), "{stderr}");
    // A window with nothing in it checks nothing and is fine.
    let run = b
        .run(&["audit", "--until", "2000-01-01", "--output-format", "json"])
        .await;
    run.assert_code(0);
    assert_eq!(u(&run.json(), "checked"), 0);
}
